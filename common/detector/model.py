"""The behaviour model: a small Hugging Face causal LM over behaviour tokens, and its LoRA adapter.

One forward pass gives every event's negative log-likelihood (NLL) given the events before it: that is
both the anomaly evidence and its explanation. The backbone is a plain `transformers` model built from a
config, so any compatible model directory can stand in for it, and it loads with plain
`AutoModelForCausalLM`. Merchants train only a LoRA adapter on its linear layers; by default FFA-LoRA:
A is a fixed random projection drawn from a seed every merchant shares, only B is trained and sent, so
averaging B across merchants averages the adapters exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from fedanom.common.errors import FedanomError
from fedanom.common.settings import BackboneConfig, LoraSettings
from fedanom.common.tokens import BOS, CONTEXT, CONTEXT_OFFSETS, CONTEXT_WIDTHS, EOS, PAD, VOCAB_SIZE

HEAD = "anomaly_head"
HEAD_PRIOR = 0.01  # the untrained head's attack probability: attacks are rare (1% = the default alert rate)


def build_backbone(
    config: BackboneConfig, seed: int = 0, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """A freshly initialised backbone (weights drawn from `seed`) on `device`."""
    if config.architecture not in ARCHITECTURES:
        raise FedanomError(
            f"unknown architecture '{config.architecture}'; choose from {', '.join(ARCHITECTURES)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[config.architecture].build(config)
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only


@dataclass(frozen=True)
class Architecture:
    build: Callable[[BackboneConfig], PreTrainedModel]
    lora_targets: tuple[str, ...]  # linear layers of the blocks (never embeddings)
    fan_in_fan_out: bool  # GPT-2 stores its linear layers transposed (Conv1D)
    # The adapter's layers unless the run names its own. Llama: the attention's q and v, 0.41% of the
    # backbone on the wire against 2.56% for all seven, at the same federated + DP AUPRC on the real
    # exports (BENCHMARKS.md, sessions 16-17). GPT-2 fuses q, k and v into one c_attn layer, which
    # peft adapts whole or not at all, so it keeps every linear layer until that is measured.
    default_targets: tuple[str, ...]


def _gpt2(c: BackboneConfig) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=c.max_events + 2 + len(CONTEXT),
        n_embd=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def _llama(c: BackboneConfig) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=c.d_model,
        intermediate_size=4 * c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads,
        max_position_embeddings=c.max_events + 2 + len(CONTEXT),
        attention_dropout=c.dropout,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        _gpt2, ("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True, default_targets=("c_attn", "c_proj", "c_fc")
    ),
    "llama": Architecture(
        _llama,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        fan_in_fan_out=False,
        default_targets=("q_proj", "v_proj"),
    ),
}


def architecture_of(model: torch.nn.Module) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ARCHITECTURES:
        raise FedanomError(f"backbone type '{kind}' is not supported; use one of {', '.join(ARCHITECTURES)}")
    return str(kind)


def add_anomaly_head(backbone: PreTrainedModel) -> None:
    """The supervised head: one logit from the last event's hidden state. It rides in the adapter as a
    peft `modules_to_save` module; plain peft loading of the adapter skips it.

    Its bias starts at the log-odds of HEAD_PRIOR rather than 0. From 0, the first steps go into pushing
    every session's logit down, and under DP noise, with a few dozen steps per round, the head then
    learned little about attacks (BENCHMARKS.md, session 6)."""
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    torch.nn.init.constant_(head.bias, math.log(HEAD_PRIOR / (1 - HEAD_PRIOR)))
    backbone.add_module(HEAD, head.to(backbone.device))


def attach_lora(backbone: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap a (device-placed) backbone with a LoRA adapter; the backbone's own weights are frozen."""
    arch = ARCHITECTURES[architecture_of(backbone)]
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.targets or arch.default_targets),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=arch.fan_in_fan_out,
        modules_to_save=[HEAD] if settings.supervised_head else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if settings.supervised_head:
            add_anomaly_head(backbone)
        try:
            model = get_peft_model(backbone, config)
        except ValueError:
            layers = sorted(
                {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if _is_linear(m)}
            )
            raise FedanomError(
                f"LoRA targets {', '.join(config.target_modules or [])} are not layers of this "
                f"{architecture_of(backbone)} backbone; its linear layers are {', '.join(layers)}"
            ) from None
    if settings.ffa:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def lora_targets_of(model: PeftModel) -> tuple[str, ...]:
    """The layers an attached adapter adapts, by name, as peft resolved them."""
    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig)
    return tuple(sorted(config.target_modules or ()))


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a merchant trains (and, in a federation, sends): LoRA B (and A unless FFA)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def pad_batch(
    sequences: list[np.ndarray], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (already framed with <bos>/<eos>) -> right-padded ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), PAD, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def forward(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass: the NLL (nats) of each token given the ones before it ([batch, width - 1], 0 at
    padding), and the supervised head's logit per sequence when the model has one.

    Each context token (the sequence's positions 1..len(CONTEXT)) is predicted among its own measure's
    buckets only, each event among the whole vocabulary. The output layer (vocabulary-sized, the model's
    costliest part) runs only at real event positions: with sessions of a few events padded to the
    longest in the batch, that is most of the work saved.
    """
    causal_lm = _unwrap(model)
    hidden = causal_lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    output = causal_lm.get_output_embeddings()
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)
    keep = mask[:, 1:].bool() & (positions >= len(CONTEXT))  # the events and <eos>
    logits = output(hidden[:, :-1][keep]).float()
    event_nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep], reduction="none")
    nll = torch.zeros(keep.shape, dtype=event_nll.dtype, device=event_nll.device)
    nll = nll.masked_scatter(keep, event_nll)
    for k, (offset, width) in enumerate(zip(CONTEXT_OFFSETS, CONTEXT_WIDTHS, strict=True)):
        buckets = (hidden[:, k] @ output.weight[offset : offset + width].T).float()
        nll[:, k] = torch.nn.functional.cross_entropy(buckets, ids[:, k + 1] - offset, reduction="none")
    head = getattr(causal_lm, HEAD, None)
    if head is None:
        return nll, None
    last = hidden[torch.arange(len(ids), device=ids.device), mask.sum(1) - 1]
    return nll, head(last).squeeze(-1).float()


def next_token_nll(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return forward(model, ids, mask)[0]


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The causal LM inside Opacus's and peft's wrappers (LoRA layers stay injected in it)."""
    inner = getattr(model, "_module", model)  # Opacus GradSampleModule
    if isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    return inner  # type: ignore[return-value]


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (merchants with GPUs use them), otherwise the CPU; `requested` overrides."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise FedanomError(f"--device {requested} was asked for but no CUDA GPU is available")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

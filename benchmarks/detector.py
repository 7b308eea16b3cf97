"""Detector benchmarks: scoring throughput, DP training cost, architecture and aggregation choice.

    python benchmarks/detector.py [--threads 2] [--device cpu|cuda] [--out bench-out]
    python benchmarks/detector.py --dp-only | --batch-sweep | --lora-sweep | --scoring-only [--device cuda]
    python benchmarks/detector.py --secure-noise

1. Scoring sessions/s on the real session-length mix of four shops in ../shared/data (or
   $FEDANOM_SHARED_DATA): a naive one-session-at-a-time loop vs length-bucketed batches; achieved FLOP/s
   (counted by torch's FlopCounterMode) as a fraction of a plain fp32 matmul measured in the same run.
2. DP-SGD step time / non-DP step time for the LoRA adapter at the same batch, and peak memory.
3. GPT-2 vs Llama backbones of the same size: quality (seeded shop with injected bots, ε = 8) and speed.
4. The session-score aggregation: validation AUPRC of each candidate.
5. What Opacus's secure-mode noise would cost a DP step (`--secure-noise`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import torch
from peft import PeftModel
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel

from fedanom.common.detector.model import (
    ARCHITECTURES,
    attach_lora,
    build_backbone,
    next_token_nll,
    pad_batch,
)
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.scoring import AGGREGATIONS, aggregate, event_surprise
from fedanom.common.detector.training import GRAD_SAMPLE_MODES, privacy_units, train_model
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import BackboneConfig, LoraSettings, TrainSettings
from fedanom.common.windows import Windows
from fedanom.simulations.attacks import ATTACKS, inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

REAL = [
    ("taobao", "taobao-userbehavior/UserBehavior_2017-11-26_window.csv.gz"),
    ("rees46", "rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz"),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.tsv.gz"),
    ("diginetica", "diginetica-sample/sample_train-item-views.csv.gz"),
]


# What a merchant could send each round: federation.py measures the bytes, --lora-sweep the quality.
ALL_LINEAR = ARCHITECTURES["llama"].lora_targets
ADAPTERS = {
    "FFA-LoRA r8, all linear": LoraSettings(targets=ALL_LINEAR),
    "LoRA r8, all linear": LoraSettings(ffa=False, targets=ALL_LINEAR),
    "FFA-LoRA r4, all linear": LoraSettings(rank=4, alpha=8, targets=ALL_LINEAR),
    "FFA-LoRA r8, q/v (the default)": LoraSettings(),
    "FFA-LoRA r4, q/v": LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj")),
}


def windows_of_file(path: Path, preset: str) -> Windows:
    ingested = ingest(path, resolve_preset(preset))
    return Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)


def peak_rss_mb() -> float:
    return _status_mb("VmHWM:")


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_flops(device: torch.device, seconds: float = 2.0) -> float:
    """FLOP/s of a plain fp32 1024x1024 matmul on this device (the achievable-peak reference)."""
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    for _ in range(3):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return runs * 2 * 1024**3 / (time.perf_counter() - start)


def scoring(model: torch.nn.Module, windows: Windows, device: torch.device) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    naive_n = min(2000, windows.n_windows)
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(naive_n):
            ids, mask = pad_batch([windows.framed(i)], device)
            next_token_nll(model, ids, mask)
        sync()
        naive = naive_n / (time.perf_counter() - start)
    results: dict[str, float] = {"naive_sessions_per_s": naive}
    for max_tokens in (2048, 8192, 32768):
        event_surprise(
            model, windows.select(np.arange(min(500, windows.n_windows))), device=device
        )  # warm-up
        start = time.perf_counter()
        event_surprise(model, windows, device=device, max_tokens=max_tokens)
        sync()
        results[f"batched_{max_tokens}_sessions_per_s"] = windows.n_windows / (time.perf_counter() - start)
    best = max((k for k in results if k.startswith("batched")), key=lambda k: results[k])
    max_tokens = int(best.split("_")[1])
    with FlopCounterMode(display=False) as counter:
        event_surprise(model, windows, device=device, max_tokens=max_tokens)
    results["best_max_tokens"] = max_tokens
    results["best_sessions_per_s"] = results[best]
    results["flops_per_session"] = counter.get_total_flops() / windows.n_windows
    results["achieved_flops"] = results["flops_per_session"] * results[best]
    return results


def dp_cost(base: PreTrainedModel, windows: Windows, device: torch.device) -> dict[str, float]:
    """Seconds per training step and per epoch of the LoRA adapter at batch 64: without DP, with DP per
    session (a step of 64 windows, like the plain one), and with DP per shopper, the default (a step of 64
    shoppers with up to 8 windows each, so per epoch is the like-for-like figure there)."""
    out = {}
    for mode, dp, unit in (("plain", False, "session"), ("dp", True, "session"), ("dp_user", True, "user")):
        out[mode], out[f"{mode}_epoch"] = train_seconds(base, windows, device, dp=dp, unit=unit)
    out["dp_over_plain"] = out["dp"] / out["plain"]
    out["dp_user_epoch_over_plain"] = out["dp_user_epoch"] / out["plain_epoch"]
    return out


def train_seconds(
    base: PreTrainedModel,
    windows: Windows,
    device: torch.device,
    *,
    dp: bool,
    batch_size: int = 64,
    grad_sample_mode: str = "hooks",
    lora: LoraSettings | None = None,
    unit: str = "session",
) -> tuple[float, float]:
    """Seconds per step and per epoch over `windows` (a step of `batch_size` units: windows per session)."""
    model = attach_lora(base, lora or LoraSettings())  # a fresh adapter on the frozen weights
    settings = TrainSettings(
        epochs=1.0, dp=dp, batch_size=batch_size, grad_sample_mode=grad_sample_mode, privacy_unit=unit
    )
    ledger = None
    if dp:
        ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / privacy_units(windows, settings), unit=unit)
    report = train_model(model, windows, settings, ledger=ledger, device=device)
    model.unload()  # takes the adapter out of the backbone again, in place
    return report.seconds / report.steps, report.seconds


def secure_noise_cost(base: PreTrainedModel, windows: Windows, device: torch.device) -> dict[str, float]:
    """Opacus's `secure_mode` needs torchcsprng, which has no build for this torch (deployment draws a
    fresh OS-entropy seed per run instead). What secure mode would add to a DP step, in its two parts:
    its noise arithmetic (four Gaussian draws per value instead of one, against floating-point attacks:
    Opacus's own noise function called with `secure_mode=True`), and the random bytes those draws need
    (8 per draw) read from the OS's CSPRNG, /dev/urandom."""
    dp = train_seconds(base, windows, device, dp=True)[0]
    original = opacus_optimizer._generate_noise

    def secure(
        std: float, reference: torch.Tensor, generator: object = None, secure_mode: bool = False
    ) -> torch.Tensor:
        return original(std, reference, generator, secure_mode=True)

    opacus_optimizer._generate_noise = secure
    try:
        arithmetic = train_seconds(base, windows, device, dp=True)[0]
    finally:
        opacus_optimizer._generate_noise = original
    model = attach_lora(base, LoraSettings())
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.unload()
    started, reads = time.perf_counter(), 50
    for _ in range(reads):
        os.urandom(8 * 4 * values)
    entropy = (time.perf_counter() - started) / reads
    return {
        "dp_step_s": dp,
        "secure_arithmetic_step_s": arithmetic,
        "urandom_bytes_s": entropy,
        "noised_values": values,
        "secure_over_dp": (arithmetic + entropy) / dp,
    }


def batch_sweep(windows: Windows, devices: list[torch.device]) -> list[dict[str, object]]:
    """Training sessions/s per device and batch size, plain and DP (each per-sample-gradient mode):
    where a GPU starts to pay off."""
    rows: list[dict[str, object]] = []
    for device in devices:
        base = build_backbone(BackboneConfig(), device=device)
        for batch_size in (64, 256, 1024):
            row: dict[str, object] = {"device": device.type, "batch_size": batch_size}
            seconds = train_seconds(base, windows, device, dp=False, batch_size=batch_size)[0]
            row["plain_sessions_per_s"] = batch_size / seconds
            for mode in GRAD_SAMPLE_MODES:
                seconds = train_seconds(
                    base, windows, device, dp=True, batch_size=batch_size, grad_sample_mode=mode
                )[0]
                row[f"dp_{mode}_sessions_per_s"] = batch_size / seconds
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def lora_sweep(device: torch.device, workdir: Path, sample: Windows) -> dict[str, dict[str, object]]:
    """Each adapter choice of benchmarks/federation.py (what a merchant sends): its detection quality
    (Llama, ε = 8, mean aggregation) and its DP step cost over a plain step."""
    out: dict[str, dict[str, object]] = {}
    for name, settings in ADAPTERS.items():
        if not settings.ffa:
            continue  # FFA-LoRA is the federated default; plain LoRA's quality is in the main run
        summary, _ = quality("llama", device, workdir, settings)
        base = build_backbone(BackboneConfig(), device=device)
        steps = {
            mode: train_seconds(base, sample, device, dp=mode == "dp", lora=settings)[0]
            for mode in ("plain", "dp")
        }
        out[name] = {
            "test": summary["aggregations"]["mean"],  # type: ignore[index]
            "epsilon": summary["epsilon"],
            "dp_over_plain": steps["dp"] / steps["plain"],
        }
        print(name, json.dumps(out[name], default=float), flush=True)
    return out


def dp_child(arch: str, dp: bool, shared: Path) -> None:
    """One training mode in a fresh process: its step time and the memory training itself added."""
    real = Windows.concat([windows_of_file(shared / name, preset) for preset, name in REAL])
    sample = real.select(np.arange(min(20_000, real.n_windows)))
    backbone = build_backbone(BackboneConfig(architecture=arch))  # step times do not depend on the weights
    before = rss_mb()
    seconds = train_seconds(backbone, sample, torch.device("cpu"), dp=dp)[0]
    print(json.dumps({"step_s": seconds, "rss_before_mb": before, "peak_mb": peak_rss_mb()}))


def quality(
    arch: str, device: torch.device, workdir: Path, lora: LoraSettings | None = None
) -> tuple[dict[str, object], PeftModel]:
    public = generate_shop(ShopConfig(n_events=60_000, n_users=6_000, n_items=20_000), seed=100)
    write_taobao_csv(public, workdir / "public.csv")
    shop = generate_shop(ShopConfig(n_events=30_000, n_users=3_000, n_items=8_000), seed=1)
    frame = inject(shop, {name: 15 for name in ATTACKS}, seed=2)
    write_taobao_csv(frame, workdir / "merchant.csv")
    kind_of = dict(zip(frame.user_id.astype(str), frame.attack, strict=False))

    base = build_backbone(BackboneConfig(architecture=arch), device=device)
    started = time.perf_counter()
    pre = train_model(
        base,
        windows_of_file(workdir / "public.csv", "taobao"),
        TrainSettings(dp=False, epochs=2, learning_rate=3e-3),
        device=device,
    )
    pretrain_s = time.perf_counter() - started
    windows = windows_of_file(workdir / "merchant.csv", "taobao")
    train, val, test = windows.chronological_split(0.6, 0.2, 0.2)
    model = attach_lora(base, lora or LoraSettings())
    settings = TrainSettings(epochs=3)
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / privacy_units(train, settings))
    fit = train_model(model, train, settings, ledger=ledger, device=device)
    labels = {
        name: np.array([kind_of[u] != "" for u in part.user]) for name, part in (("val", val), ("test", test))
    }
    kinds = np.array([kind_of[u] for u in test.user])
    surprise = {
        name: event_surprise(model, part, device=device) for name, part in (("val", val), ("test", test))
    }
    aggregations = {
        how: {
            "val_auprc": average_precision_score(labels["val"], aggregate(surprise["val"], val, how)),
            "test_auroc": roc_auc_score(labels["test"], aggregate(surprise["test"], test, how)),
            "test_auprc": average_precision_score(labels["test"], aggregate(surprise["test"], test, how)),
        }
        for how in AGGREGATIONS
    }
    summary = {
        "architecture": arch,
        "pretrain_seconds": pretrain_s,
        "pretrain_loss": pre.mean_loss,
        "dp_fit_seconds": fit.seconds,
        "epsilon": fit.epsilon_spent,
        "aggregations": aggregations,
    }
    forest = IsolationForest(random_state=0).fit(train.features)
    forest_scores = -forest.score_samples(test.features)
    summary["isolation_forest"] = {
        "test_auroc": roc_auc_score(labels["test"], forest_scores),
        "test_auprc": average_precision_score(labels["test"], forest_scores),
    }
    ours = aggregate(surprise["test"], test, "mean")
    normal = kinds == ""
    summary["per_attack_test_auroc"] = {
        kind: {
            "mean_score": roc_auc_score(
                labels["test"][normal | (kinds == kind)], ours[normal | (kinds == kind)]
            ),
            "isolation_forest": roc_auc_score(
                labels["test"][normal | (kinds == kind)], forest_scores[normal | (kinds == kind)]
            ),
        }
        for kind in ATTACKS
        if (kinds == kind).any()
    }
    return summary, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--dp-only", action="store_true", help="only DP vs plain step time and memory")
    parser.add_argument("--batch-sweep", action="store_true", help="only training speed per batch size")
    parser.add_argument("--lora-sweep", action="store_true", help="only quality and DP cost per adapter")
    parser.add_argument(
        "--scoring-only",
        action="store_true",
        help="only scoring throughput (default backbone, untrained: speed does not depend on weights) "
        "against IsolationForest's, and the DP step cost",
    )
    parser.add_argument("--secure-noise", action="store_true", help="only what secure-mode noise costs")
    parser.add_argument("--dp-child", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    shared = Path(
        os.environ.get("FEDANOM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    machine = {
        "platform": platform.platform(),
        "cpu_threads": args.threads,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results: dict[str, object] = {"machine": machine}
    if args.dp_child:
        dp_child(args.dp_child[0], args.dp_child[1] == "dp", shared)
        return
    if args.dp_only:  # each mode in a fresh process, so each peak is its own
        for arch in ("gpt2", "llama"):
            modes = {}
            for mode in ("plain", "dp"):
                child = subprocess.run(
                    [sys.executable, __file__, "--dp-child", arch, mode],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                modes[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            modes["dp_over_plain"] = modes["dp"]["step_s"] / modes["plain"]["step_s"]
            results[f"dp_step_{arch}"] = modes
            print(arch, json.dumps(modes), flush=True)
        (args.out / f"detector-dp-{device.type}.json").write_text(json.dumps(results, indent=2))
        return
    real = Windows.concat([windows_of_file(shared / name, preset) for preset, name in REAL])
    sample = real.select(np.arange(min(20_000, real.n_windows)))
    if args.lora_sweep:
        results["lora_sweep"] = lora_sweep(device, args.out, sample)
        (args.out / f"detector-lora-{device.type}.json").write_text(
            json.dumps(results, indent=2, default=float)
        )
        return
    if args.secure_noise:
        results["secure_noise"] = secure_noise_cost(
            build_backbone(BackboneConfig(), device=device), sample, device
        )
        print(json.dumps(results, indent=1), flush=True)
        (args.out / f"detector-secure-{device.type}.json").write_text(json.dumps(results, indent=2))
        return
    if args.batch_sweep:  # the CPU row is the same-run baseline for the device's
        results["batch_sweep"] = batch_sweep(sample, list(dict.fromkeys([torch.device("cpu"), device])))
        (args.out / f"detector-batches-{device.type}.json").write_text(json.dumps(results, indent=2))
        return

    if args.scoring_only:
        model = attach_lora(build_backbone(BackboneConfig(), device=device), LoraSettings())
        results[f"scoring_{BackboneConfig().architecture}"] = scoring(model, real, device)
        forest = IsolationForest(random_state=0).fit(sample.features)
        start = time.perf_counter()
        forest.score_samples(real.features)
        results["isolation_forest_sessions_per_s"] = real.n_windows / (time.perf_counter() - start)
        results["dp_step"] = dp_cost(model.unload(), sample, device)
        print(json.dumps(results, indent=1, default=float), flush=True)
        (args.out / f"detector-scoring-{device.type}.json").write_text(
            json.dumps(results, indent=2, default=float)
        )
        return

    archs = {}
    for arch in ("gpt2", "llama"):
        q, model = quality(arch, device, args.out)
        archs[arch] = (q, model)
        print(json.dumps(q, indent=1, default=float), flush=True)
    results["quality"] = {arch: q for arch, (q, _) in archs.items()}

    lengths = real.lengths
    results["real_sessions"] = {
        "sessions": real.n_windows,
        "events": int(lengths.sum()),
        "median_events": float(np.median(lengths)),
        "p99_events": float(np.quantile(lengths, 0.99)),
    }
    reference = matmul_flops(device)
    results["matmul_fp32_flops"] = reference
    for arch, (_, model) in archs.items():
        s = scoring(model, real, device)
        s["fraction_of_matmul"] = s["achieved_flops"] / reference
        s["batched_over_naive"] = s["best_sessions_per_s"] / s["naive_sessions_per_s"]
        results[f"scoring_{arch}"] = s
        print(arch, json.dumps(s, indent=1), flush=True)
    default_model = archs[BackboneConfig().architecture][1]
    results["dp_step"] = dp_cost(default_model.unload(), sample, device)
    results["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(results["dp_step"], indent=1), flush=True)
    (args.out / f"detector-{device.type}.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"written to {args.out / f'detector-{device.type}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

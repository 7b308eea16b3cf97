"""Getting the frozen backbone to every merchant: asked by hash, shipped only to those that lack it.

Before a merchant first trains or evaluates, the server asks it (a Flower `query` message) whether it
holds the backbone with the run's content hash. A merchant that does not gets the backbone's files in a
second query and installs them in its state directory only if they hash to the announced value
(`backbone.install_backbone`). Merchants that already hold it receive nothing but the question, so a
federation of merchants with `base/` on disk costs one round trip per merchant per run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedanom.common.backbone import backbone_files, backbone_hash
from fedanom.server.replies import BadReply, backbone_answer, failure


class BackboneShipper:
    """Remembers which merchants hold the run's backbone; ships it to the others on demand."""

    def __init__(self, base: Path, timeout: float) -> None:
        self.base = base
        self.hash = backbone_hash(base)
        self.timeout = timeout
        self.holding: set[int] = set()

    def ensure(self, grid: Grid, nodes: Iterable[int]) -> dict[int, str]:
        """Make sure every node holds the backbone; returns {node: reason} for those that could not."""
        asked = [node for node in nodes if node not in self.holding]
        if not asked:
            return {}
        answers, failed = self._ask(grid, asked, files=None)
        lacking = [node for node, has in answers.items() if not has]
        if lacking:
            after, ship_failed = self._ask(grid, lacking, files=backbone_files(self.base))
            failed.update(ship_failed)
            answers.update(after)
        self.holding.update(node for node, has in answers.items() if has)
        for node in asked:
            if node not in self.holding and node not in failed:
                failed[node] = "did not answer whether it holds the backbone"
        return failed

    def _ask(
        self, grid: Grid, nodes: list[int], files: dict[str, bytes] | None
    ) -> tuple[dict[int, bool], dict[int, str]]:
        config = ConfigRecord({"backbone-hash": self.hash})
        if files is not None:
            config["backbone-names"] = list(files)
            config["backbone-files"] = list(files.values())
        messages = [
            Message(RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        answers: dict[int, bool] = {}
        failed: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = failure(reply)
                continue
            try:
                answers[node] = backbone_answer(reply)
            except BadReply as exc:
                failed[node] = str(exc)
        return answers, failed

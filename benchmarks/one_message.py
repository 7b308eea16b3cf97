"""One round's message to one merchant, answered in this fresh process as a real ClientApp process would
(`federation.py` starts it, to time a message's cold start).

    python benchmarks/one_message.py train|evaluate MESSAGE.json ADAPTER.npz

Imports only what Flower's `flwr-clientapp` process imports before the handler runs (Flower and the
ClientApp module), rebuilds the message that `federation.py` wrote (the merchant's node config, the
round's config, the global adapter), and prints the reply's metrics and the wall-clock time it was
ready, as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import MessageType

from fedanom.client import app
from fedanom.common.records import to_record


def main() -> None:
    kind, spec_path, adapter_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    context = Context(run_id=1, node_id=7, node_config=spec["node"], state=RecordDict(), run_config={})
    with np.load(adapter_path) as saved:
        arrays = to_record({name: saved[name] for name in saved.files})
    message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    metadata = Metadata(1, "m", 0, 7, "", "", 0.0, 3600.0, message_type)
    content = RecordDict({"config": ConfigRecord(spec["config"]), "arrays": arrays})
    msg = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    reply = (app.train if kind == "train" else app.evaluate)(msg, context)
    if reply.has_error():
        raise SystemExit(f"the merchant failed: {reply.error.reason}")
    print(json.dumps({"ready": time.time(), **dict(reply.content.metric_records["metrics"])}))


if __name__ == "__main__":
    main()

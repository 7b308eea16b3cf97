"""A merchant's own labels: which of its sessions it knows to be attacks (0/1), keyed by session or user.

`fedanom train --labels` trains the supervised head on them. In a federation they measure the global
detector on the merchant's validation sessions (AUROC, reported as a metric), keep known attacks out of
its calibration and, where the federation's adapter has a head (`fedanom server --supervised-head`),
train that head on the merchant's training sessions: the averaged head then carries what every
labelled merchant knows of attacks to all of them. Labels never leave the merchant; the head's update
leaves under the same DP as the rest of the adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedanom.common.errors import FedanomError
from fedanom.common.windows import Windows


def read_labels(path: Path, windows: Windows) -> np.ndarray:
    """One 0/1 label per window; sessions the file does not list count as 0."""
    key, lookup = load_label_table(path)
    ids = windows.session if key == "session_id" else windows.user
    return np.array([lookup.get(i, 0) for i in ids], dtype=np.int8)


def load_label_table(path: Path) -> tuple[str, dict[str, int]]:
    """A labels CSV as (its key column, session_id or user_id; {id: 0 or 1}); a bad file is one sentence."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise FedanomError(f"{path} cannot be read as a labels CSV ({exc})") from None
    key = next((k for k in ("session_id", "user_id") if k in table.columns), None)
    if key is None or "label" not in table.columns:
        raise FedanomError(f"{path} needs a label column and a session_id or user_id column")
    values = pd.to_numeric(table["label"], errors="coerce")
    bad = values.isna() | ~values.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
        raise FedanomError(
            f"{path}: line {row}, column 'label': must be 0 or 1, not '{table['label'].iloc[row - 2]}'"
        )
    return key, dict(zip(table[key], values.astype(int), strict=True))

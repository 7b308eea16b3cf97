"""Real event exports as simulated merchants: a file of any preset, as the shop generator's event table.

The attack injectors (simulations.attacks) work on that table, so the same labelled bot sessions can be
added to real traffic as to synthetic shops. Each session of the export becomes one user: exports with
session ids (YOOCHOOSE, DIGINETICA, REES46) keep them, and anonymous DIGINETICA sessions stay apart
instead of merging under the shared "NA" user. Timestamps are kept to the second (the Taobao layout's
resolution). Every row is read or the read fails: nothing is dropped on the way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fedanom.common.events import EVENT_TYPES
from fedanom.common.loader import EventReader
from fedanom.common.presets import resolve_preset


def real_shop(path: str | Path, preset: str) -> pd.DataFrame:
    """Columns user_id, item_id, category_id, event_type, timestamp (Unix s), sorted by time."""
    tables = list(EventReader(Path(path), resolve_preset(preset), on_bad_rows="fail"))
    events = pa.concat_tables(tables).to_pandas()
    session_key = np.where(
        events.sess.to_numpy() != 0, "s:" + events.sess_raw.fillna(""), "u:" + events.user_raw
    )
    frame = pd.DataFrame(
        {
            "user_id": pd.factorize(session_key)[0].astype(np.int64),
            "item_id": events.item.to_numpy(),
            "category_id": events.cat.to_numpy(),
            "event_type": np.asarray(EVENT_TYPES, dtype=object)[events.etype.to_numpy()],
            "timestamp": events.ts.to_numpy() // 1000,
        }
    )
    return frame.sort_values("timestamp", kind="stable", ignore_index=True)

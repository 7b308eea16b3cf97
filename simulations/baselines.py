"""The classical baselines behind the detector's interface: PyOD's IsolationForest and ECOD on the
session features, fitted on windows and scoring windows (higher = more anomalous), as
`BehaviourDetector` does, so one harness fits and scores every method the same way."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pyod.models.base import BaseDetector
from pyod.models.ecod import ECOD
from pyod.models.iforest import IForest

from fedanom.common.windows import Windows


class FeatureBaseline:
    """A PyOD detector over each window's session features (`fedanom.common.features`)."""

    def __init__(self, model: BaseDetector) -> None:
        self.model = model

    def fit(self, windows: Windows) -> FeatureBaseline:
        self.model.fit(windows.features)
        return self

    def decision_function(self, windows: Windows) -> np.ndarray:
        return np.asarray(self.model.decision_function(windows.features))


# name -> a fresh baseline for a seed; ECOD has no randomness. ECOD (Li et al., 2022) scores how far into
# the tails of the training sessions' per-feature distributions a session lies.
BASELINES: dict[str, Callable[[int], FeatureBaseline]] = {
    "isolation-forest": lambda seed: FeatureBaseline(IForest(random_state=seed)),
    "ecod": lambda seed: FeatureBaseline(ECOD()),
}

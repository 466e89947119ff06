"""Training side only (imports scikit-learn): one-vs-rest logistic regression with per-class
feature masks, the base estimator of the failure classifier (see :mod:`agent.score.classifier`).

Each class ``c`` gets its own binary ``LogisticRegression`` (``c`` against every other class,
balanced class weights) fitted on its *evidence* columns only; its coefficients are zero on
every other column. The decision function is therefore one linear map,
``X @ coef_.T + intercept_``, exactly like a multinomial model's, so the compiled artifact and
the per-sample scorer are unchanged.

Why masks: fitted on every feature, a classifier trained on one host's few fault episodes
learns whatever happened to move during them. On the recording host the hypervisor's CPU
steal rose during the disk and memory faults, and the model called steady CPU load on a quiet
node ``disk_full`` and ``memory_exhaustion``. With masks a class can only be argued for by the
subsystem whose failure it names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

ABSENT_INTERCEPT = -30.0  # a class missing from a training fold: decision ~ never


class EvidenceLogistic(ClassifierMixin, BaseEstimator):  # type: ignore[misc]  # sklearn is untyped
    """``masks``: class -> column indices it may use (a class not listed uses every column)."""

    def __init__(self, masks: Mapping[str, Sequence[int]] | None = None, c_reg: float = 0.1,
                 max_iter: int = 5000) -> None:
        self.masks = masks
        self.c_reg = c_reg
        self.max_iter = max_iter

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike) -> EvidenceLogistic:
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y)
        self.classes_ = np.unique(ya)
        d = xa.shape[1]
        coef = np.zeros((self.classes_.size, d))
        icpt = np.full(self.classes_.size, ABSENT_INTERCEPT)
        masks = self.masks or {}
        for ci, c in enumerate(self.classes_):
            cols = np.asarray(masks.get(str(c), range(d)), dtype=np.intp)
            yb = ya == c
            if cols.size == 0 or yb.all() or not yb.any():
                continue
            lr = LogisticRegression(C=self.c_reg, class_weight="balanced", max_iter=self.max_iter)
            lr.fit(xa[:, cols], yb)
            coef[ci, cols] = lr.coef_[0]
            icpt[ci] = lr.intercept_[0]
        self.coef_ = coef
        self.intercept_ = icpt
        self.n_features_in_ = d
        return self

    def decision_function(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        z: npt.NDArray[np.float64] = np.asarray(x, dtype=np.float64) @ self.coef_.T + self.intercept_
        return z

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.generic]:
        labels: npt.NDArray[np.generic] = self.classes_[np.argmax(self.decision_function(x), axis=1)]
        return labels

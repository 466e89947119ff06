"""Turn fault-harness recordings (``run.py`` output) into feature rows, labels and groups.

Shared by ``train.py`` (classifier training and held-out metrics) and ``evaluate.py`` (replay
through :class:`agent.score.stage.RiskStage`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.features.schema import FeatureSchema  # noqa: E402
from agent.features.window import FeatureWindow  # noqa: E402
from agent.score.classifier import NONE  # noqa: E402

F64 = npt.NDArray[np.float64]
CHUNK_S = 60.0  # fault-free samples are grouped in chunks of this many seconds


@dataclass
class Recording:
    name: str
    keys: list[str]
    x: F64
    wall: F64
    mono: F64
    seq: npt.NDArray[np.int64]
    label: list[str]
    phase: list[str]
    faults: list[dict[str, object]]
    phases: list[tuple[str, float, float]]

    def metrics(self) -> Iterator[dict[str, float | None]]:
        """Each sample's metrics dict (missing values as None, as the sampler reports them)."""
        keys = self.keys
        for row in self.x:
            yield {k: (None if v != v else v) for k, v in zip(keys, row.tolist(), strict=True)}  # noqa: PLR0124

    def groups(self) -> list[str]:
        """Episode id per sample: the fault it belongs to, else its phase and 60-s chunk."""
        out = []
        t0 = float(self.wall[0]) if self.wall.size else 0.0
        fault_of = np.full(self.wall.size, -1)
        for i, f in enumerate(self.faults):
            end = f["end"] if np.isfinite(f["end"]) else self.wall[-1]  # type: ignore[call-overload]
            fault_of[(self.wall >= f["start"]) & (self.wall <= end)] = i  # type: ignore[operator]
        for i in range(self.wall.size):
            if fault_of[i] >= 0:
                out.append(f"{self.name}/fault{fault_of[i]}")
            else:
                out.append(f"{self.name}/{self.phase[i]}/{int((self.wall[i] - t0) // CHUNK_S)}")
        return out


def load(path: str | Path) -> Recording:
    with np.load(path, allow_pickle=False) as z:
        classes = [str(c) for c in z["classes"]]
        label = [NONE if v == 0 else classes[v - 1] for v in z["label"].tolist()]
        faults = [
            {"cls": str(c), "name": str(n), "start": float(s), "failure": float(fl), "end": float(e)}
            for c, n, s, fl, e in zip(z["fault_class"], z["fault_name"], z["fault_start"],
                                      z["fault_failure"], z["fault_end"], strict=True)
        ]
        phases = [(str(n), float(s), float(e)) for n, s, e in zip(z["phase_names"], z["phase_start"],
                                                                  z["phase_end"], strict=True)]
        return Recording(name=Path(path).stem, keys=[str(k) for k in z["keys"]], x=np.asarray(z["X"]),
                         wall=np.asarray(z["wall"]), mono=np.asarray(z["mono"]), seq=np.asarray(z["seq"]),
                         label=label, phase=[str(p) for p in z["phase"]], faults=faults, phases=phases)


def features(rec: Recording, schema: FeatureSchema) -> F64:
    """Replay the recording through a fresh FeatureWindow: one feature row per sample."""
    fw = FeatureWindow(schema)
    out = np.empty((rec.x.shape[0], schema.dim))
    for i, m in enumerate(rec.metrics()):
        out[i] = fw.push_metrics(m, float(rec.mono[i]))
    return out

"""Settings of the score stage (``[model]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class ModelSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # Rules only until this much history exists (seconds of samples at 1 Hz).
    cold_start_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 600.0
    # Refit the node's anomaly detector on a rolling window this often (sooner in early life:
    # each time its history has doubled since the last fit, while that is the shorter wait).
    refit_interval_s: Annotated[float, msgspec.Meta(ge=60)] = 6 * 3600.0
    window_s: Annotated[float, msgspec.Meta(ge=60)] = 24 * 3600.0
    # Path of a failure-classifier artifact; empty means the one shipped with heald.
    classifier_path: str = ""

"""``heald fleet silence NODE DURATION``: hold the node's automatic playbook runs for a while;
``heald fleet unsilence NODE`` lifts the hold before its time.

Sampling, scoring and reporting go on, and manual runs and approvals still work; only the
playbooks' own triggers are not evaluated until the silence ends. The pipeline asks
:meth:`Silence.holds` once per sample.
"""

from __future__ import annotations


class Silence:
    def __init__(self) -> None:
        self.until = 0.0  # wall clock; 0 = not silenced

    def holds(self, wall: float) -> bool:
        """Whether automatic playbook runs are held at wall-clock time ``wall``."""
        return wall < self.until

"""systemd unit states, reported by the processes collector.

For the units in ``[collect.processes] units``, one ``systemctl show UNIT... --property=
ActiveState,SubState,NRestarts,MainPID`` per pass (argv list, no shell, ``systemctl_timeout_s``;
the executable is the ``systemctl`` setting, a path or a name looked up in PATH at start).

Metrics:

============================ ========================================================================
``unit.active[UNIT]``        1 when ActiveState is active/reloading, else 0
``unit.failed[UNIT]``        1 when ActiveState is failed, else 0
``unit.restarts[UNIT]``      NRestarts: automatic restarts since the unit was started
============================ ========================================================================

The ``unit.*`` metrics are absent when systemctl is not installed and None when it is but cannot
answer (systemd is not PID 1, no D-Bus, timeout).

Detail: ``units``: ``{UNIT: {ActiveState, SubState, NRestarts, MainPID}}``.

Why not a collector of its own: the unit states have always been part of the ``processes``
collector (its settings, its readings, its state in a Sample, its schedule), and consumers rely
on that. :class:`UnitStates` is the part of that collector that runs a subprocess, kept apart
from the /proc scan.
"""

from __future__ import annotations

import shutil
import subprocess

from agent.collect.sample import Detail, Metrics, key
from agent.collect.settings import ProcessSettings

UNIT_PROPERTIES = ("ActiveState", "SubState", "NRestarts", "MainPID")
# ActiveState values that count as running (a reload keeps the service up).
_ACTIVE = frozenset({"active", "reloading"})


def parse_systemctl_show(text: str, units: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``systemctl show A B`` prints one ``Key=Value`` block per unit, in order, blank-line separated."""
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        name, sep, value = line.partition("=")
        if sep:
            blocks[-1][name] = value
    blocks = [b for b in blocks if b]
    return dict(zip(units, blocks, strict=False))


class UnitStates:
    """The ``unit.*`` metrics and ``units`` detail of the configured units; see the module docstring."""

    __slots__ = ("_args", "_command", "_keys", "_timeout_s", "systemctl", "units")

    def __init__(self, settings: ProcessSettings) -> None:
        self.units = settings.units
        self._command = settings.systemctl
        self._timeout_s = settings.systemctl_timeout_s
        # Everything after the executable, and each unit's metric keys: built once, not per pass.
        self._args = ("show", *self.units, f"--property={','.join(UNIT_PROPERTIES)}")
        self._keys = tuple(
            (unit, key("unit.active", unit), key("unit.failed", unit), key("unit.restarts", unit))
            for unit in self.units
        )
        # The systemctl executable found at start; None (metrics absent) without units or systemctl.
        self.systemctl: str | None = None

    def start(self) -> None:
        if self.units:
            # Absent (not None) when systemctl is not installed at all.
            self.systemctl = shutil.which(self._command)

    def read(self, m: Metrics, detail: Detail) -> None:
        """One ``systemctl show`` of every unit into ``m`` and ``detail``; nothing before start()."""
        systemctl = self.systemctl
        if systemctl is None:
            return
        try:
            done = subprocess.run(
                [systemctl, *self._args],
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            states = parse_systemctl_show(done.stdout, self.units) if done.returncode == 0 else {}
        except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
            states = {}
        for unit, active_key, failed_key, restarts_key in self._keys:
            st = states.get(unit)
            active = st.get("ActiveState") if st is not None else None
            m[active_key] = None if active is None else float(active in _ACTIVE)
            m[failed_key] = None if active is None else float(active == "failed")
            restarts = st.get("NRestarts", "") if st is not None else ""
            m[restarts_key] = float(restarts) if restarts.isdigit() else None
        detail["units"] = states

"""Settings of the decide/act stages (``[playbooks]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class PlaybookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Operator playbooks; the shipped library (remediations/) is always loaded first.
    dirs: tuple[str, ...] = ("/etc/heald/playbooks.d",)
    load_shipped: bool = True
    # Forces every playbook into dry-run regardless of its own mode.
    force_mode: Literal["", "dry-run", "off"] = ""
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    # Roots under which clean actions may delete; nothing outside is ever touched.
    clean_roots: tuple[str, ...] = ("/var/tmp", "/tmp", "/var/cache")
    # Processes never killed by any action (names or argv[0] basenames).
    protected_processes: tuple[str, ...] = (
        "systemd", "init", "sshd", "heald", "journald", "systemd-journald", "dbus-daemon", "containerd",
    )

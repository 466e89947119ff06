"""Installing the systemd units for a pip/pipx installation (``heald install-units``, whose flags
and output are in :mod:`agent.cli.units`).

The Debian package installs the units itself. After ``pipx install --global heald`` (or a pip
install into any system-wide virtualenv) this command copies the same files, shipped inside
the wheel, into place, with every ``ExecStart=`` rewritten to this installation:

  heald.service, heald-action@.service[, heald-coordinator.service]  -> --prefix
  sysusers.d/heald.conf   -> /etc/sysusers.d/heald.conf   (the ``heald`` system user)
  tmpfiles.d/heald.conf   -> /etc/tmpfiles.d/heald.conf
  polkit/60-heald.rules   -> /etc/polkit-1/rules.d/60-heald.rules
  heald-action            -> --libexec-dir/heald-action   (root-only action helper)
  agent.toml              -> /etc/heald/agent.toml        (the commented defaults; only if absent)

It starts, enables and reloads nothing: it prints the commands that do, for the operator to
run with consent. ``--root`` stages everything below another directory (packaging, tests).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from agent.errors import HealdError, InputError, Problem
from agent.fsutil import atomic_write

DEFAULT_PREFIX = "/etc/systemd/system"
DEFAULT_LIBEXEC = "/usr/local/lib/heald"
# Paths as written in the shipped units (the Debian layout).
PACKAGED_HEALD = "/usr/bin/heald"
PACKAGED_COORDINATOR = "/usr/bin/heald-coordinator"
PACKAGED_ACTION = "/usr/lib/heald/heald-action"
# heald.service has ProtectHome=yes and runs as user heald: an executable under these is
# invisible (or unreadable) to the service.
HIDDEN_ROOTS = ("/home", "/root", "/run/user")


@dataclass(frozen=True)
class InstallOptions:
    """What ``heald install-units`` was asked to do (see :mod:`agent.cli.units` for the flags)."""

    prefix: str = DEFAULT_PREFIX
    libexec_dir: str = DEFAULT_LIBEXEC
    executable: str | None = None  # None: this installation's heald
    coordinator: bool | None = None  # None: when heald-coordinator is installed beside heald
    root: str = "/"


@dataclass(frozen=True)
class Planned:
    source: str  # name inside the shipped unit directory
    dest: Path  # final path (below --root)
    content: bytes
    mode: int
    status: str = ""  # "new" | "updated" | "unchanged" | "kept" (existing config, never replaced)


def shipped_dir() -> Traversable:
    """The unit files: ``agent/_systemd`` in a wheel, ``systemd/`` in a source checkout."""
    packaged = resources.files("agent") / "_systemd"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "systemd"
    if (checkout / "heald.service").is_file():
        return checkout
    raise HealdError("the systemd units are not in this installation (agent/_systemd is missing)")


def shipped_packaging_file(name: str) -> bytes:
    """``packaging/<name>``: ``agent/_systemd/<name>`` in a wheel, ``packaging/`` in a checkout."""
    packaged = resources.files("agent") / "_systemd" / name
    if packaged.is_file():
        return packaged.read_bytes()
    checkout = Path(__file__).resolve().parents[2] / "packaging" / name
    if checkout.is_file():
        return checkout.read_bytes()
    raise HealdError(f"{name} is not in this installation (agent/_systemd/{name} is missing)")


def current_executable(name: str = "heald") -> Path | None:
    """The console script ``name`` of the environment this process runs in."""
    candidates = [Path(sys.prefix) / "bin" / name]
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == name:
        candidates.insert(0, argv0)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.absolute()
    return None


def _check_executable(path: Path, option: str, root: Path) -> list[Problem]:
    """Problems with ``path`` as ExecStart= of heald.service; it is looked up below ``root``."""
    problems = []
    text = str(path)
    if not path.is_absolute():
        problems.append(Problem(file=option, key="", message=f"{text} is not an absolute path"))
    elif any(text == r or text.startswith(r + "/") for r in HIDDEN_ROOTS):
        problems.append(Problem(
            file=option, key="",
            message=f"{text} is under a home directory, which heald.service cannot see "
                    "(ProtectHome=yes, User=heald); install system-wide, e.g. "
                    "`sudo pipx install --global heald`, or pass --executable"))
    elif not ((on_disk := _below(root, text)).is_file() and os.access(on_disk, os.X_OK)):
        problems.append(Problem(file=option, key="", message=f"{text} is not an executable file"))
    elif re.search(r"\s", text):
        problems.append(Problem(file=option, key="", message=f"{text!r} contains whitespace"))
    return problems


def rewrite_exec(text: str, old: str, new: str) -> str:
    """Replace the executable ``old`` at the start of ExecStart=/ExecStartPre=/... lines."""
    pattern = re.compile(rf"^(Exec[A-Za-z]*=[-@:+!]*){re.escape(old)}(?=\s|$)", re.MULTILINE)
    return pattern.sub(lambda m: m.group(1) + new, text)


HELPER_EXECUTABLES = "heald_executables=(/usr/bin/heald /usr/local/bin/heald)"


def helper_for(text: str, heald: str) -> str:
    """heald-action with ``heald`` first among the executables whose interpreter runs its scans
    (leakscan-*: ``python3 -m agent.act.procscan`` next to heald's real path)."""
    if heald in ("/usr/bin/heald", "/usr/local/bin/heald"):
        return text
    if HELPER_EXECUTABLES not in text:
        raise HealdError("the shipped heald-action has no heald_executables line to point at this heald")
    return text.replace(HELPER_EXECUTABLES, f"heald_executables=({shlex.quote(heald)} /usr/bin/heald "
                        "/usr/local/bin/heald)", 1)


def _below(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def plan(args: InstallOptions) -> list[Planned]:
    """Every file to install, with its content, mode and whether it is new, changed or kept."""
    problems: list[Problem] = []
    root = Path(args.root)
    if args.executable is not None:
        heald = Path(args.executable)
        problems += _check_executable(heald, "--executable", root)
    else:
        found = current_executable()
        if found is None:
            raise InputError([Problem(file="--executable", key="",
                                      message="cannot find this installation's heald executable; "
                                              "pass --executable PATH")])
        heald = found
        problems += _check_executable(heald, "heald executable", Path("/"))
    for option, value in (("--prefix", args.prefix), ("--libexec-dir", args.libexec_dir)):
        if not Path(value).is_absolute():
            problems.append(Problem(file=option, key="", message=f"{value} is not an absolute path"))
    if problems:
        raise InputError(problems)

    coordinator = heald.with_name("heald-coordinator")
    coordinator_on_disk = _below(root if args.executable is not None else Path("/"), str(coordinator))
    want_coordinator = args.coordinator
    if want_coordinator is None:
        want_coordinator = coordinator_on_disk.is_file() and os.access(coordinator_on_disk, os.X_OK)
    elif want_coordinator and not coordinator_on_disk.is_file():
        raise InputError([Problem(file="--coordinator", key="",
                                  message=f"{coordinator} does not exist (is the coordinator installed?)")])

    action = f"{args.libexec_dir.rstrip('/')}/heald-action"
    src = shipped_dir()
    units = ["heald.service", "heald-action@.service"]
    if want_coordinator:
        units.append("heald-coordinator.service")

    out: list[Planned] = []
    for name in units:
        text = (src / name).read_text(encoding="utf-8")
        text = rewrite_exec(text, PACKAGED_HEALD, str(heald))
        text = rewrite_exec(text, PACKAGED_COORDINATOR, str(coordinator))
        text = rewrite_exec(text, PACKAGED_ACTION, action)
        header = f"# Installed by `heald install-units` for {heald}; edit with `systemctl edit`.\n"
        out.append(Planned(name, _below(root, f"{args.prefix}/{name}"), (header + text).encode(), 0o644))
    for name, dest in (("sysusers.d/heald.conf", "/etc/sysusers.d/heald.conf"),
                       ("tmpfiles.d/heald.conf", "/etc/tmpfiles.d/heald.conf"),
                       ("polkit/60-heald.rules", "/etc/polkit-1/rules.d/60-heald.rules")):
        parts = name.split("/")
        out.append(Planned(name, _below(root, dest), src.joinpath(*parts).read_bytes(), 0o644))
    helper = shipped_packaging_file("heald-action").decode("utf-8")
    out.append(Planned("heald-action", _below(root, action), helper_for(helper, str(heald)).encode(), 0o755))
    planned = [_with_status(p) for p in out]
    config = _below(root, "/etc/heald/agent.toml")
    # The operator's configuration is never replaced: written only when there is none.
    status = "kept" if config.exists() or config.is_symlink() else "new"
    planned.append(Planned("agent.toml", config, shipped_packaging_file("agent.toml"), 0o644, status))
    return planned


def _with_status(p: Planned) -> Planned:
    try:
        current = p.dest.read_bytes()
    except FileNotFoundError:
        status = "new"
    except OSError as exc:
        raise HealdError(f"cannot read {p.dest}: {exc.strerror or exc}") from None
    else:
        same_mode = stat.S_IMODE(p.dest.stat().st_mode) == p.mode
        status = "unchanged" if current == p.content and same_mode else "updated"
    return Planned(p.source, p.dest, p.content, p.mode, status)


def write(planned: list[Planned]) -> None:
    """Atomically write every planned file that is new or changed."""
    for p in planned:
        if p.status in ("new", "updated"):
            try:
                atomic_write(p.dest, p.content, mode=p.mode)
            except OSError as exc:
                raise HealdError(f"cannot write {p.dest}: {exc.strerror or exc}"
                                 " (run as root, or use --root/--dry-run)") from None


NEXT_STEPS = (
    "systemd-sysusers heald.conf",
    "systemd-tmpfiles --create heald.conf",
    "systemctl daemon-reload",
    "heald check --config /etc/heald/agent.toml",
    "systemctl enable --now heald",
)

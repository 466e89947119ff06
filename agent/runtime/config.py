"""Agent configuration: TOML files + environment, validated into frozen typed settings.

Sources, later wins:
  1. the main file (``/etc/heald/agent.toml`` by default),
  2. ``conf.d/*.toml`` beside it, in name order,
  3. ``HEALD_<SECTION>__<KEY>`` environment variables (``HEALD_COLLECT__CPU__INTERVAL_S=2``).

Every problem is reported at once, each naming the file (or variable), the line where the
key stands and the dotted key; unknown keys get a did-you-mean. Loading never half-applies:
it returns a complete :class:`Settings` or raises :class:`~agent.errors.ConfigError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from agent.collect.settings import CollectSettings
from agent.control.settings import CoordinatorSettings
from agent.decide.settings import PlaybookSettings, SecuritySettings
from agent.errors import ConfigError, Problem, toml_key_lines
from agent.features.cost import CostSettings
from agent.features.demand_history import DemandSettings
from agent.report.settings import MqttSettings
from agent.score.settings import ModelSettings

DEFAULT_CONFIG = Path("/etc/heald/agent.toml")
ENV_PREFIX = "HEALD_"
NODE_ID_RE = r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})?$"


class NodeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Defaults to the host name. Used in MQTT topics, so limited to [A-Za-z0-9_.-].
    id: Annotated[str, msgspec.Meta(pattern=NODE_ID_RE)] = ""
    site: Annotated[str, msgspec.Meta(pattern=NODE_ID_RE)] = "default"
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class PathSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Spool, journal, audit log, models and counters live here (systemd's StateDirectory).
    state_dir: str = "/var/lib/heald"
    runtime_dir: str = "/run/heald"


class LogSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: the console renderer when stdout is a terminal, JSON lines otherwise (journald, files,
    # pipes). Every record carries `priority` (syslog: 3 error, 4 warning, 6 info, 7 debug); on
    # systemd's journal stream each JSON line starts with <N>, which journald takes as its priority.
    format: Literal["auto", "json", "console"] = "auto"


class SampleSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # The pipeline assembles one sample from every collector's latest reading this often.
    interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 1.0
    # A collector's reading older than this many of its own intervals is reported stale.
    stale_after: Annotated[float, msgspec.Meta(ge=1, le=100)] = 3.0


class PrometheusSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    listen: str = "127.0.0.1:9108"


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    node: NodeSettings = NodeSettings()
    paths: PathSettings = PathSettings()
    log: LogSettings = LogSettings()
    sample: SampleSettings = SampleSettings()
    collect: CollectSettings = CollectSettings()
    mqtt: MqttSettings = MqttSettings()
    model: ModelSettings = ModelSettings()
    playbooks: PlaybookSettings = PlaybookSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    cost: CostSettings = CostSettings()
    demand: DemandSettings = DemandSettings()
    security: SecuritySettings = SecuritySettings()


@dataclass
class _Source:
    """Where each dotted key came from, for error messages."""

    origin: dict[str, str] = field(default_factory=dict)  # dotted key -> file or env var
    lines: dict[str, int] = field(default_factory=dict)  # dotted key -> line in that file


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    files: tuple[Path, ...]
    raw: dict[str, Any]


def config_files(main: Path) -> list[Path]:
    """The main file and its conf.d drop-ins, in the order they are merged."""
    files = [main]
    dropin = main.parent / "conf.d"
    if dropin.is_dir():
        files.extend(sorted(p for p in dropin.glob("*.toml") if p.is_file() or p.is_symlink()))
    return files


def _merge(into: dict[str, Any], new: Mapping[str, Any], src: _Source, origin: str,
           lines: Mapping[str, int], *, prefix: str = "") -> None:
    for k, v in new.items():
        dotted = f"{prefix}{k}"
        src.origin[dotted] = origin
        if dotted in lines:
            src.lines[dotted] = lines[dotted]
        else:
            src.lines.pop(dotted, None)
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v, src, origin, lines, prefix=dotted + ".")
        elif isinstance(v, Mapping):
            into[k] = {}
            _merge(into[k], v, src, origin, lines, prefix=dotted + ".")
        else:
            into[k] = v


def _parse_env_value(raw: str) -> Any:
    """An env value is read as a TOML value when it is one (``2``, ``true``, ``["a"]``), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, list[str], Any]]:
    out = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(path):
            continue
        out.append((name, path, _parse_env_value(env[name])))
    return out


def _struct_type(tp: Any) -> type[msgspec.Struct] | None:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    return None


def _check(data: Any, struct: type[msgspec.Struct], prefix: str, src: _Source,
           problems: list[Problem]) -> None:
    """Validate ``data`` against ``struct`` field by field so every problem is reported."""
    where = prefix.rstrip(".")
    if not isinstance(data, dict):
        problems.append(_problem(src, where, f"must be a table, got {type(data).__name__}"))
        return
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(fields))}"
            problems.append(_problem(src, dotted, f"unknown key '{k}'{hint}"))
            continue
        f = fields[k]
        sub = _struct_type(f.type)
        if sub is not None:
            _check(v, sub, dotted + ".", src, problems)
            continue
        base = get_args(f.type)[0] if get_origin(f.type) is Annotated else f.type
        if get_origin(base) is dict and isinstance(v, dict):
            _, value_type = get_args(base)
            for item_key, item in v.items():
                try:
                    msgspec.convert(item, value_type)
                except msgspec.ValidationError as exc:
                    problems.append(_problem(src, f"{dotted}.{item_key}", str(exc).partition(" - at")[0],
                                             fallback=dotted))
            continue
        try:
            msgspec.convert(v, f.type)
        except msgspec.ValidationError as exc:
            msg = str(exc)
            # msgspec says "... - at `$[0].port`": keep the message, re-root the path on our key.
            detail, _, at = msg.partition(" - at `$")
            at_key = dotted + at.rstrip("`") if at else dotted
            if at_key != dotted:
                problems.append(_problem(src, at_key, detail, fallback=dotted))
            else:
                problems.append(_problem(src, dotted, detail))


def _problem(src: _Source, dotted: str, message: str, fallback: str | None = None) -> Problem:
    look = dotted
    if look not in src.origin and fallback is not None:
        look = fallback
    while look not in src.origin and "." in look:
        look = look.rsplit(".", 1)[0]
    origin = src.origin.get(look, "<defaults>")
    # The line: of the key itself, else of the nearest enclosing key from the same source
    # (inline tables and arrays of tables put several keys on one line).
    line_key = look
    while line_key not in src.lines and "." in line_key:
        line_key = line_key.rsplit(".", 1)[0]
    line = src.lines.get(line_key) if src.origin.get(line_key) == origin else None
    return Problem(file=origin, key=dotted, message=message, line=line)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None,
                hostname: str | None = None) -> LoadedConfig:
    """Load, merge and validate the configuration. Raises ConfigError listing every problem."""
    main = path or Path(os.environ.get("HEALD_CONFIG", str(DEFAULT_CONFIG)))
    env = os.environ if env is None else env
    src = _Source()
    merged: dict[str, Any] = {}
    problems: list[Problem] = []
    files = config_files(main)
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            if file == main and path is None and main == DEFAULT_CONFIG:
                continue  # no /etc/heald/agent.toml: every default applies
            problems.append(Problem(file=str(file), key="", message="cannot read: no such file"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(Problem(file=str(file), key="", message=f"cannot read: {reason}"))
            continue
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
            problems.append(Problem(file=str(file), key="", message=f"invalid TOML: {exc}",
                                    line=int(m.group(1)) if m else None))
            continue
        _merge(merged, doc, src, str(file), toml_key_lines(text))

    for name, keypath, value in _env_overrides(env):
        node = merged
        ok = True
        for part in keypath[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(Problem(file=f"env {name}", key=".".join(keypath),
                                        message=f"'{part}' is not a table"))
                ok = False
                break
            node = nxt
        if ok:
            node[keypath[-1]] = value
            dotted = ".".join(keypath)
            src.origin[dotted] = f"env {name}"
            src.lines.pop(dotted, None)

    _check(merged, Settings, "", src, problems)
    if problems:
        raise ConfigError(problems)
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:  # cross-field check the per-field pass cannot see
        raise ConfigError([Problem(file=str(main), key="", message=str(exc))]) from None
    if not settings.node.id:
        node_id = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname or socket.gethostname())[:63] or "node"
        settings = msgspec.structs.replace(
            settings, node=msgspec.structs.replace(settings.node, id=node_id))
    problems = _semantic_checks(settings, src)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(settings=settings, files=tuple(f for f in files if f.exists()), raw=merged)


def _semantic_checks(s: Settings, src: _Source) -> list[Problem]:
    """Checks that involve more than one key."""
    problems = []
    tls = s.mqtt.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        problems.append(_problem(src, "mqtt.tls.cert_file",
                                 "cert_file and key_file must be given together"))
    if s.mqtt.backoff_initial_s > s.mqtt.backoff_max_s:
        problems.append(_problem(src, "mqtt.backoff_initial_s", "must not exceed backoff_max_s"))
    for name in ("cpu", "memory", "disk", "network", "processes", "gpu"):
        c = getattr(s.collect, name)
        if c.timeout_s > c.interval_s * 2:
            problems.append(_problem(src, f"collect.{name}.timeout_s",
                                     f"{c.timeout_s} s exceeds twice interval_s ({c.interval_s} s)"))
    for i, entry in enumerate(s.security.allow_list):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            problems.append(_problem(src, "security.allow_list",
                                     f"entry {i} ({entry[:64]!r}) is not an address or a CIDR network"))
    host, sep, port = s.prometheus.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(_problem(src, "prometheus.listen", "must be HOST:PORT"))
    return problems

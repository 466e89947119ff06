"""Load and validate playbooks: YAML -> JSON Schema -> semantic checks -> typed :class:`Playbook`.

Every problem names the file, the line and the field (``steps[1].params.unit``). Lines come
from PyYAML's node marks (``yaml.compose``), so a schema error found on the plain data is
mapped back to where it stands in the file. Loading is all or nothing: ``load_playbooks``
returns the complete list or raises :class:`~agent.errors.PlaybookError` with every problem.

YAML note: only ``true``/``false`` are booleans here (YAML 1.2 style), so ``mode: off`` is the
string "off" and not YAML 1.1's ``False``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, cast

import jsonschema
import yaml

from agent.decide.model import (
    BUILTIN_VARS,
    PLACEHOLDER,
    AllCond,
    AnyCond,
    Condition,
    Escalate,
    EventCond,
    FailureCond,
    ForecastCond,
    Guards,
    KeyPattern,
    LabelPattern,
    MetricCond,
    Playbook,
    RiskCond,
    Step,
    Verify,
    bound_vars,
    walk,
)
from agent.decide.settings import PlaybookSettings
from agent.decide.units import parse_duration, parse_size
from agent.errors import PlaybookError, Problem

SCHEMA_RESOURCE = "playbook.schema.json"
_VAR = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")
_TARGET_SELECTORS = ("pid", "unit", "name", "cmdline", "top", "zombie_parent")
_DISCRIMINATORS = ("metric", "forecast", "risk", "failure", "event", "all", "any")
_ARGV_PARAMS = frozenset({"argv"})


@cache
def schema() -> dict[str, Any]:
    """The shipped JSON Schema (draft 2020-12)."""
    text = resources.files("agent.decide").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def action_names() -> frozenset[str]:
    """The action vocabulary, from the schema's ``params_<action>`` definitions."""
    return frozenset(k.removeprefix("params_") for k in schema()["$defs"] if k.startswith("params_"))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def shipped_dir() -> Path:
    """The shipped library: packaged as agent/_remediations, or remediations/ in a source tree."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_remediations"
    return packaged if packaged.is_dir() else here.parent / "remediations"


# --------------------------------------------------------------------------- YAML with positions


class _Loader(yaml.SafeLoader):
    """SafeLoader where only true/false are booleans (``off``, ``yes``, ``on`` stay strings)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)

Path_ = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Line of every value (and of every mapping key) in one YAML document."""

    values: dict[Path_, int] = field(default_factory=dict)
    keys: dict[Path_, int] = field(default_factory=dict)
    duplicates: list[tuple[Path_, int]] = field(default_factory=list)

    def line(self, path: Iterable[str | int], *, key: bool = False) -> int | None:
        p = tuple(path)
        if key and p in self.keys:
            return self.keys[p]
        while p:
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), None)


def _map_nodes(node: yaml.Node, path: Path_, out: SourceMap) -> None:
    out.values[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            name = str(k.value)
            if name in seen:
                out.duplicates.append(((*path, name), k.start_mark.line + 1))
            seen.add(name)
            out.keys[(*path, name)] = k.start_mark.line + 1
            _map_nodes(v, (*path, name), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _map_nodes(v, (*path, i), out)


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document, returning the data and where each value stands."""
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # e.g. control characters the YAML reader refuses
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc}")]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc.problem or exc}", line)]) from None
    except yaml.YAMLError as exc:
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    smap = SourceMap()
    if node is not None:
        _map_nodes(node, (), smap)
    return data, smap


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- schema errors


def _ambiguous_conditions(data: Any) -> list[tuple[Path_, list[str]]]:
    """Conditions naming more than one kind (``metric:`` and ``event:``): one clear problem each,
    instead of the schema's per-branch "unknown field" noise."""
    out: list[tuple[Path_, list[str]]] = []

    def visit(node: Any, path: Path_) -> None:
        if not isinstance(node, Mapping):
            return
        kinds = [k for k in _DISCRIMINATORS if k in node]
        if len(kinds) > 1:
            out.append((path, kinds))
            return
        for k in ("all", "any"):
            if isinstance(node.get(k), list):
                for i, item in enumerate(node[k]):
                    visit(item, (*path, k, i))

    if isinstance(data, Mapping):
        visit(data.get("trigger"), ("trigger",))
        verify = data.get("verify")
        if isinstance(verify, Mapping):
            visit(verify.get("expect"), ("verify", "expect"))
    return out


def _schema_problems(data: Any, file: str, smap: SourceMap) -> list[Problem]:
    problems: list[Problem] = []
    ambiguous = _ambiguous_conditions(data)
    for apath, kinds in ambiguous:
        problems.append(
            Problem(
                file,
                dotted(apath),
                f"a condition has exactly one of {', '.join(_DISCRIMINATORS)}; found {', '.join(kinds)}",
                smap.line(apath),
            )
        )
    for err in _validator().iter_errors(data):
        path: Path_ = tuple(err.absolute_path)
        if any(path[: len(a)] == a for a, _ in ambiguous):
            continue
        v = err.validator
        inst = err.instance
        if v == "required" and isinstance(inst, Mapping):
            problems.extend(
                Problem(file, dotted((*path, k)), f"missing required field '{k}'", smap.line(path))
                for k in cast("list[str]", err.validator_value)
                if k not in inst
            )
        elif v == "additionalProperties" and isinstance(inst, Mapping):
            known = list(err.schema.get("properties", {}))
            for k in inst:
                if k not in known:
                    hint = difflib.get_close_matches(str(k), known, n=1)
                    extra = (
                        f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(known) or 'none'})"
                    )
                    problems.append(
                        Problem(
                            file,
                            dotted((*path, k)),
                            f"unknown field '{k}'{extra}",
                            smap.line((*path, k), key=True),
                        )
                    )
        elif v in ("anyOf", "oneOf") and "x-error" in err.schema:
            problems.append(Problem(file, dotted(path), str(err.schema["x-error"]), smap.line(path)))
        elif "x-error" in err.schema:
            got = repr(inst) if len(repr(inst)) <= 60 else repr(inst)[:57] + "..."
            problems.append(
                Problem(file, dotted(path), f"{err.schema['x-error']} (got {got})", smap.line(path))
            )
        else:
            msg = err.message if len(err.message) <= 200 else err.message[:197] + "..."
            problems.append(Problem(file, dotted(path), msg, smap.line(path)))
    # the same problem can be reached through several schema branches
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line or 0, p.key))


# --------------------------------------------------------------------------- building + semantics


class _Builder:
    """Builds typed objects from schema-valid data, collecting semantic problems."""

    def __init__(self, file: str, smap: SourceMap, settings: PlaybookSettings) -> None:
        self.file = file
        self.smap = smap
        self.settings = settings
        self.problems: list[Problem] = []
        self._ids = itertools.count()

    def err(self, path: Path_, message: str, *, key: bool = False) -> None:
        self.problems.append(Problem(self.file, dotted(path), message, self.smap.line(path, key=key)))

    def duration(self, value: Any, path: Path_, default: float) -> float:
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default

    def key_pattern(self, text: str, path: Path_) -> KeyPattern:
        family, sep, rest = text.partition("[")
        if not sep:
            return KeyPattern(family, LabelPattern())
        label = rest[:-1]
        if label == "*":
            return KeyPattern(family, LabelPattern(var="label"))
        if m := _VAR.match(label):
            if m.group(1) in BUILTIN_VARS:
                self.err(path, f"'{{{m.group(1)}}}' is reserved; choose another variable name")
            return KeyPattern(family, LabelPattern(var=m.group(1)))
        if any(c in label for c in "{}*"):
            self.err(path, f"bad label in metric key {text!r}: use a literal, '*' or '{{name}}'")
        return KeyPattern(family, LabelPattern(literal=label))

    def condition(self, d: Mapping[str, Any], path: Path_) -> Condition:
        cid = next(self._ids)
        present = [k for k in _DISCRIMINATORS if k in d]
        if len(present) > 1:
            self.err(
                path,
                f"a condition has exactly one of {', '.join(_DISCRIMINATORS)}; found {', '.join(present)}",
            )
        kind = present[0]
        if kind == "metric":
            op = str(d["op"])
            cb, ca = d.get("clear_below"), d.get("clear_above")
            if cb is not None and op not in (">", ">="):
                self.err(
                    (*path, "clear_below"), "clear_below only applies to '>' and '>=' comparisons", key=True
                )
            if ca is not None and op not in ("<", "<="):
                self.err(
                    (*path, "clear_above"), "clear_above only applies to '<' and '<=' comparisons", key=True
                )
            if cb is not None and cb > d["value"]:
                self.err((*path, "clear_below"), f"clear_below ({cb}) must not exceed value ({d['value']})")
            if ca is not None and ca < d["value"]:
                self.err((*path, "clear_above"), f"clear_above ({ca}) must not be below value ({d['value']})")
            return MetricCond(
                cid,
                self.key_pattern(d["metric"], (*path, "metric")),
                op,
                float(d["value"]),
                self.duration(d.get("for"), (*path, "for"), 0.0),
                None if cb is None else float(cb),
                None if ca is None else float(ca),
            )
        if kind == "forecast":
            return ForecastCond(
                cid,
                self.key_pattern(d["forecast"], (*path, "forecast")),
                self.duration(d["eta_below"], (*path, "eta_below"), 0.0),
                float(d.get("min_confidence", 0.5)),
            )
        if kind == "risk":
            return RiskCond(
                cid, d["risk"], float(d.get("above", 1.0)), self.duration(d.get("for"), (*path, "for"), 0.0)
            )
        if kind == "failure":
            return FailureCond(cid, str(d["failure"]), float(d["above"]))
        if kind == "event":
            values = frozenset(_norm(v) for v in d["values"]) if "values" in d else None
            ignore = frozenset(_norm(v) for v in d.get("ignore_values", ()))
            if values is not None and values & ignore:
                self.err(
                    (*path, "ignore_values"), f"values {sorted(values & ignore)} are both matched and ignored"
                )
            labels: list[tuple[str, LabelPattern]] = []
            for lk, lv in d.get("labels", {}).items():
                if lv == "*":
                    labels.append((lk, LabelPattern(var=lk)))
                elif m := _VAR.match(lv):
                    labels.append((lk, LabelPattern(var=m.group(1))))
                elif any(c in lv for c in "{}*"):
                    self.err(
                        (*path, "labels", lk), f"bad label pattern {lv!r}: use a literal, '*' or '{{name}}'"
                    )
                else:
                    labels.append((lk, LabelPattern(literal=lv)))
            return EventCond(
                cid,
                str(d["event"]),
                values,
                ignore,
                int(d.get("count", 1)),
                self.duration(d.get("within"), (*path, "within"), 600.0),
                tuple(labels),
            )
        items = tuple(self.condition(c, (*path, kind, i)) for i, c in enumerate(d[kind]))
        return AllCond(cid, items) if kind == "all" else AnyCond(cid, items)

    def placeholders(self, value: Any, path: Path_, bound: frozenset[str], *, argv: bool = False) -> None:
        if isinstance(value, str):
            names = PLACEHOLDER.findall(value)
            if argv and names and not _VAR.match(value):
                self.err(
                    path, f"placeholder in {value!r} must be a whole argv element, like '{{{names[0]}}}'"
                )
            for name in names:
                if name not in bound and name not in BUILTIN_VARS:
                    known = sorted(bound | BUILTIN_VARS)
                    self.err(
                        path, f"'{{{name}}}' is not bound by the trigger (bound here: {', '.join(known)})"
                    )
        elif isinstance(value, Mapping):
            for k, v in value.items():
                self.placeholders(v, (*path, k), bound, argv=argv or k in _ARGV_PARAMS)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.placeholders(v, (*path, i), bound, argv=argv)

    def step(self, d: Mapping[str, Any], i: int, bound: frozenset[str]) -> Step:
        path: Path_ = ("steps", i)
        action = str(d["action"])
        params: dict[str, Any] = dict(d.get("params") or {})
        if action not in action_names():
            hint = difflib.get_close_matches(action, sorted(action_names()), n=1)
            extra = (
                f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(action_names()))})"
            )
            self.err((*path, "action"), f"unknown action '{action}'{extra}")
        self.placeholders(params, (*path, "params"), bound)
        self._action_semantics(action, params, (*path, "params"))
        return Step(
            i,
            str(d.get("name", f"{i + 1}-{action}")),
            action,
            params,
            self.duration(d.get("timeout"), (*path, "timeout"), 60.0),
            bool(d.get("verify", True)),
        )

    def _action_semantics(self, action: str, params: Mapping[str, Any], path: Path_) -> None:
        target = params.get("target")
        if isinstance(target, Mapping):
            chosen = [k for k in _TARGET_SELECTORS if k in target]
            exclusive = [k for k in ("pid", "unit") if k in target]
            if exclusive and len(chosen) > 1:
                self.err(
                    (*path, "target"),
                    f"target {exclusive[0]} names one process; it cannot be combined with "
                    f"{', '.join(k for k in chosen if k != exclusive[0])}",
                )
            elif not chosen:
                self.err((*path, "target"), f"target needs one of {', '.join(_TARGET_SELECTORS)}")
            elif "top" in target and "zombie_parent" in target:
                self.err((*path, "target"), "target top and zombie_parent cannot be combined")
            for rx in ("name", "cmdline"):
                if isinstance(target.get(rx), str) and not PLACEHOLDER.search(target[rx]):
                    try:
                        re.compile(target[rx])
                    except re.error as exc:
                        self.err((*path, "target", rx), f"not a valid regular expression: {exc}")
            if "measure" in target:
                self.duration(target["measure"], (*path, "target", "measure"), 1.0)
        for k in ("grace", "older_than", "max_age"):
            if k in params:
                self.duration(params[k], (*path, k), 0.0)
        for k in ("larger_than", "max_size", "memory_high", "memory_max"):
            if k in params:
                try:
                    parse_size(params[k])
                except ValueError as exc:
                    self.err((*path, k), str(exc))
        if action == "vacuum_journal" and not ({"max_size", "max_age"} & set(params)):
            self.err(path, "vacuum_journal needs max_size or max_age")
        if action == "rotate_logs" and len({"config", "files"} & set(params)) != 1:
            self.err(path, "rotate_logs needs exactly one of config (logrotate -f) or files (copytruncate)")
        if action == "cgroup_limit" and not ({"memory_high", "memory_max", "cpu_pct"} & set(params)):
            self.err(path, "cgroup_limit needs at least one of memory_high, memory_max, cpu_pct")
        if action == "clean_paths":
            roots = [os.path.normpath(r) for r in self.settings.clean_roots]
            for j, p in enumerate(params.get("paths", ())):
                if PLACEHOLDER.search(p):
                    continue
                if not os.path.isabs(p):
                    self.err((*path, "paths", j), f"{p!r} is not an absolute path")
                elif not any(_within(os.path.normpath(p), r) for r in roots):
                    self.err(
                        (*path, "paths", j),
                        f"{p!r} is outside playbooks.clean_roots ({', '.join(roots)}); "
                        "nothing there is ever deleted",
                    )
        if action in ("run_command", "restart_process"):
            argv = params.get("argv") or []
            if argv and PLACEHOLDER.search(str(argv[0])):
                self.err((*path, "argv", 0), "the program (argv[0]) must be a literal, not a placeholder")
        if action == "cordon" and not self.settings.cordon_argv:
            self.err(
                (*path[:-1], "action"),
                'cordon needs playbooks.cordon_argv in agent.toml (e.g. ["kubectl", "cordon", "{node}"])',
            )

    def playbook(self, d: Mapping[str, Any], shipped: bool) -> Playbook:
        trigger = self.condition(d["trigger"], ("trigger",))
        bound = bound_vars(trigger)
        steps = tuple(self.step(s, i, bound) for i, s in enumerate(d["steps"]))
        names: dict[str, int] = {}
        for s in steps:
            if s.name in names:
                self.err(
                    ("steps", s.index, "name"), f"step name '{s.name}' is used by steps[{names[s.name]}] too"
                )
            names[s.name] = s.index
        v = d.get("verify") or {}
        expect = self.condition(v["expect"], ("verify", "expect")) if "expect" in v else None
        if expect is not None:
            for c in walk(expect):
                if isinstance(c, MetricCond) and c.for_s:
                    self.err(
                        ("verify", "expect"),
                        "verify.expect is checked once after settle; 'for' is not allowed",
                    )
        verify = Verify(self.duration(v.get("settle"), ("verify", "settle"), 10.0), expect)
        g = d.get("guards") or {}
        mr = g.get("max_runs") or {}
        br = g.get("breaker") or {}
        guards = Guards(
            cooldown_s=self.duration(g.get("cooldown"), ("guards", "cooldown"), 300.0),
            backoff=float(g.get("backoff", 2.0)),
            max_cooldown_s=self.duration(g.get("max_cooldown"), ("guards", "max_cooldown"), 3600.0),
            max_runs=int(mr.get("count", 6)),
            window_s=self.duration(mr.get("window"), ("guards", "max_runs", "window"), 3600.0),
            breaker_failures=int(br.get("failures", 3)),
            breaker_reset_s=(
                None
                if br.get("reset_after") is None
                else self.duration(br["reset_after"], ("guards", "breaker", "reset_after"), 0.0)
            ),
            cold_start=g.get("cold_start", "hold"),
            disconnected=g.get("disconnected", "act"),
        )
        if guards.max_cooldown_s < guards.cooldown_s:
            self.err(("guards", "max_cooldown"), "max_cooldown must not be shorter than cooldown")
        if guards.window_s <= 0:
            self.err(("guards", "max_runs", "window"), "window must be longer than 0s")
        e = d.get("escalate") or {}
        self.placeholders(e.get("message", ""), ("escalate", "message"), bound)
        escalate = Escalate(
            e.get("event", "playbook.escalated"), e.get("severity", "critical"), e.get("message", "")
        )
        return Playbook(
            name=d["name"],
            description=d["description"],
            mode=d.get("mode", "enforce"),
            trigger=trigger,
            steps=steps,
            verify=verify,
            guards=guards,
            escalate=escalate,
            source=self.file,
            source_line=self.smap.line(()),
            shipped=shipped,
            raw=dict(d),
        )


def _norm(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# --------------------------------------------------------------------------- files


def parse_playbook(
    text: str, file: str, settings: PlaybookSettings | None = None, *, shipped: bool = False
) -> tuple[Playbook | None, list[Problem]]:
    """Validate one playbook document; returns (playbook or None, problems)."""
    settings = settings or PlaybookSettings()
    try:
        data, smap = parse_yaml(text, file)
    except PlaybookError as exc:
        return None, exc.problems
    problems = [Problem(file, dotted(p), f"duplicate key '{p[-1]}'", line) for p, line in smap.duplicates]
    if not isinstance(data, Mapping):
        return None, [
            *problems,
            Problem(
                file, "", "a playbook file holds one mapping (name:, trigger:, steps:, ...)", smap.line(())
            ),
        ]
    problems += _schema_problems(data, file, smap)
    if problems:
        return None, problems
    builder = _Builder(file, smap, settings)
    pb = builder.playbook(data, shipped)
    if builder.problems:
        return None, sorted(dict.fromkeys(builder.problems), key=lambda p: (p.line or 0, p.key))
    return pb, []


def playbook_files(settings: PlaybookSettings) -> Iterator[tuple[Path, bool]]:
    """Every playbook file to load, shipped first, then each operator directory in name order."""
    dirs: list[tuple[Path, bool]] = []
    if settings.load_shipped:
        dirs.append((shipped_dir(), True))
    dirs.extend((Path(d), False) for d in settings.dirs)
    for d, shipped in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix in (".yaml", ".yml") and p.is_file():
                yield p, shipped


def _settings_of(settings: object) -> PlaybookSettings:
    if isinstance(settings, PlaybookSettings):
        return settings
    inner = getattr(settings, "playbooks", None)
    if isinstance(inner, PlaybookSettings):
        return inner
    raise TypeError(f"expected PlaybookSettings or Settings, got {type(settings).__name__}")


def _load(settings: PlaybookSettings) -> tuple[list[Playbook], list[Problem]]:
    playbooks: list[Playbook] = []
    problems: list[Problem] = []
    seen: dict[str, Playbook] = {}
    for path, shipped in playbook_files(settings):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(path), "", f"cannot read: {exc}"))
            continue
        pb, probs = parse_playbook(text, str(path), settings, shipped=shipped)
        problems.extend(probs)
        if pb is None:
            continue
        if pb.name in seen:
            first = seen[pb.name]
            problems.append(
                Problem(
                    str(path),
                    "name",
                    f"duplicate playbook name '{pb.name}' (first defined in {first.source}:"
                    f"{first.source_line or 1}); names must be unique across files",
                    _name_line(text),
                )
            )
            continue
        seen[pb.name] = pb
        playbooks.append(pb)
    return playbooks, problems


def _name_line(text: str) -> int | None:
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("name:"):
            return n
    return None


def check_playbooks(settings: object) -> list[Problem]:
    """Every problem in every playbook file (``heald check``); empty when all are valid."""
    return _load(_settings_of(settings))[1]


def load_playbooks(settings: object) -> list[Playbook]:
    """All playbooks, or PlaybookError listing every problem (nothing half-loaded)."""
    playbooks, problems = _load(_settings_of(settings))
    if problems:
        raise PlaybookError(problems)
    return playbooks

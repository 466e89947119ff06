"""Build the typed :class:`~agent.decide.model.Playbook` from schema-valid data, checking what a
JSON Schema cannot express: placeholders bound by the trigger, hysteresis that fits the
comparison, regular expressions that compile, paths inside ``clean_roots``, and so on.

Every problem is collected (with its file, line and field) rather than raised, so that
``heald check`` lists all of them at once.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

from agent.decide.model import (
    BUILTIN_VARS,
    MAX_VERIFY_WITHIN_S,
    PLACEHOLDER,
    AllCond,
    AnyCond,
    Condition,
    DemandCond,
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
from agent.decide.schema import DISCRIMINATORS, action_names
from agent.decide.settings import PlaybookSettings
from agent.decide.source import FieldPath, SourceMap, dotted
from agent.decide.units import parse_duration, parse_size
from agent.errors import Problem

# a value that is one whole placeholder, "{name}"
_VAR = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")
# the keys of a step's ``target`` that pick processes (the others only filter)
_TARGET_SELECTORS = ("pid", "unit", "name", "cmdline", "top", "zombie_parent")
# params that are argv lists: a placeholder there must be a whole element
_ARGV_PARAMS = frozenset({"argv"})


class PlaybookBuilder:
    """Builds typed objects from schema-valid data, collecting semantic problems."""

    def __init__(self, file: str, smap: SourceMap, settings: PlaybookSettings) -> None:
        self.file = file
        self.smap = smap
        self.settings = settings
        self.problems: list[Problem] = []
        self._ids = itertools.count()

    def err(self, path: FieldPath, message: str, *, key: bool = False) -> None:
        self.problems.append(Problem(self.file, dotted(path), message, self.smap.line(path, key=key)))

    def mounts(self, d: Mapping[str, Any], kind: str, path: FieldPath) -> Any:
        """``mounts: cleanable|uncleanable``, only on a disk.* key whose label is a variable."""
        mounts = d.get("mounts")
        key = str(d[kind])
        if mounts is not None and not (key.startswith("disk.") and "[{" in key):
            self.err((*path, "mounts"), f"mounts applies to a disk.* {kind} whose label is a {{variable}}, "
                     "e.g. disk.used_pct[{mount}]", key=True)
        return mounts

    def duration(self, value: Any, path: FieldPath, default: float) -> float:
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default

    def key_pattern(self, text: str, path: FieldPath) -> KeyPattern:
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

    def condition(self, d: Mapping[str, Any], path: FieldPath) -> Condition:
        cid = next(self._ids)
        present = [k for k in DISCRIMINATORS if k in d]
        if len(present) > 1:
            self.err(
                path,
                f"a condition has exactly one of {', '.join(DISCRIMINATORS)}; found {', '.join(present)}",
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
            mounts = self.mounts(d, "metric", path)
            return MetricCond(
                cid,
                self.key_pattern(d["metric"], (*path, "metric")),
                op,
                float(d["value"]),
                self.duration(d.get("for"), (*path, "for"), 0.0),
                None if cb is None else float(cb),
                None if ca is None else float(ca),
                mounts,
            )
        if kind == "forecast":
            return ForecastCond(
                cid,
                self.key_pattern(d["forecast"], (*path, "forecast")),
                self.duration(d["eta_below"], (*path, "eta_below"), 0.0),
                float(d.get("min_confidence", 0.5)),
                self.mounts(d, "forecast", path),
            )
        if kind == "demand":
            return DemandCond(cid, self.key_pattern(d["demand"], (*path, "demand")), float(d["above"]),
                              self.duration(d.get("within"), (*path, "within"), 7200.0),
                              d.get("bound", "point"))
        if kind == "idle":  # a metric below a line for a while: the reclaim hooks' trigger
            return MetricCond(cid, self.key_pattern(d["idle"], (*path, "idle")), "<", float(d["below"]),
                              self.duration(d.get("for"), (*path, "for"), 3600.0))
        if kind == "risk":
            return RiskCond(
                cid, d["risk"], float(d.get("above", 1.0)), self.duration(d.get("for"), (*path, "for"), 0.0)
            )
        if kind == "failure":
            name = str(d["failure"])
            pattern = self.key_pattern(name, (*path, "failure")) if "[" in name else None
            return FailureCond(cid, name, float(d["above"]),
                               pattern if pattern is not None and pattern.label.var is not None else None)
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

    def placeholders(self, value: Any, path: FieldPath, bound: frozenset[str], *, argv: bool = False) -> None:
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
        path: FieldPath = ("steps", i)
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

    def _action_semantics(self, action: str, params: Mapping[str, Any], path: FieldPath) -> None:
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
                        "verify.expect is checked without timers; 'for' is not allowed",
                    )
        within = self.duration(v.get("within"), ("verify", "within"), 0.0)
        if within > MAX_VERIFY_WITHIN_S:
            self.err(("verify", "within"), f"within is at most {MAX_VERIFY_WITHIN_S / 3600:g}h")
        verify = Verify(self.duration(v.get("settle"), ("verify", "settle"), 10.0), expect, within)
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
            max_parallel=None if g.get("max_parallel") is None else int(g["max_parallel"]),
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


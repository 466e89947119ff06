"""The shipped JSON Schema (draft 2020-12): loading it, the action vocabulary it defines, and its
errors turned into problems that name the file, the line and the field.

The schema's ``x-error`` keywords carry the message for a failed check, so that a playbook
author reads "not a duration: use seconds or a string like 250ms, ..." instead of the
validator's regular expression.

jsonschema is imported only when a document does not conform (:mod:`agent.decide.conform` says
whether it does): the daemon, whose playbooks are valid, never loads it (issue 25).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from agent.decide.conform import conforms
from agent.decide.source import FieldPath, SourceMap, dotted
from agent.errors import Problem

if TYPE_CHECKING:
    import jsonschema

SCHEMA_RESOURCE = "playbook.schema.json"
# the keys that say which kind a condition is; a condition has exactly one
DISCRIMINATORS = ("metric", "forecast", "demand", "idle", "risk", "failure", "event", "all", "any")


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
    import jsonschema  # noqa: PLC0415 - only to explain a document that does not conform

    return jsonschema.Draft202012Validator(schema())



def _ambiguous_conditions(data: Any) -> list[tuple[FieldPath, list[str]]]:
    """Conditions naming more than one kind (``metric:`` and ``event:``): one clear problem each,
    instead of the schema's per-branch "unknown field" noise."""
    out: list[tuple[FieldPath, list[str]]] = []

    def visit(node: Any, path: FieldPath) -> None:
        if not isinstance(node, Mapping):
            return
        kinds = [k for k in DISCRIMINATORS if k in node]
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


def schema_problems(data: Any, file: str, smap: SourceMap) -> list[Problem]:
    """Every schema violation in ``data``, one problem each, in line order."""
    problems: list[Problem] = []
    ambiguous = _ambiguous_conditions(data)
    for apath, kinds in ambiguous:
        problems.append(
            Problem(
                file,
                dotted(apath),
                f"a condition has exactly one of {', '.join(DISCRIMINATORS)}; found {', '.join(kinds)}",
                smap.line(apath),
            )
        )
    if conforms(data, schema()):  # nothing for jsonschema to find (nor to import it for)
        return sorted(dict.fromkeys(problems), key=lambda p: (p.line or 0, p.key))
    for err in _validator().iter_errors(data):
        path: FieldPath = tuple(err.absolute_path)
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

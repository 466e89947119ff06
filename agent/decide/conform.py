"""Does a playbook conform to the shipped schema? A yes/no answer without jsonschema.

:func:`agent.decide.schema.schema_problems` needs jsonschema only to explain what is wrong:
its errors, their paths and the schema branch that failed. A playbook that conforms has
nothing to explain, and every shipped and installed playbook conforms whenever the daemon
starts or reloads. :func:`conforms` answers that question for the keywords the shipped schema
uses (draft 2020-12: ``type``, ``properties``, ``additionalProperties``, ``required``,
``$ref`` to ``#/$defs``, ``if``/``then``, ``allOf``, ``anyOf``, ``enum``, ``const``,
``pattern``, ``minLength``/``maxLength``, ``minimum``/``maximum``/``exclusiveMinimum``,
``items``, ``minItems``/``maxItems``; annotations ignored), with jsonschema's own semantics for
each (its type checker: an integer-valued float is an ``integer``, a bool is not a number;
its ``equal`` for ``enum``/``const``: ``True`` is not ``1``; ``re.search`` for ``pattern``).

Only a "yes" is trusted: a "no", or a keyword outside that list (:class:`Unsupported`: a
schema edited since), sends the document to jsonschema, which finds and words the problems.
So the daemon keeps jsonschema and its dependencies (attrs, referencing, rpds, idna, ~3.4 MiB
of resident memory, issue 25) out of its process while its playbooks are valid, and an invalid
playbook is reported exactly as before. tests/test_daemon_memory.py checks the two answers
agree on the shipped playbooks, the test fixtures and generated mutations of them.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from agent.errors import HealdError

#: Keywords that constrain nothing (annotations, the definitions table, ``then``/``else`` which
#: only ``if`` reads).
_ANNOTATIONS: Final = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description", "default",
                                 "examples", "x-error", "then", "else"})


class Unsupported(HealdError):
    """The schema uses a keyword (or a ``$ref``) :func:`conforms` does not implement."""


def _is_type(instance: Any, kind: str) -> bool:
    """jsonschema's draft 2020-12 type checker."""
    if kind == "object":
        return isinstance(instance, dict)
    if kind == "array":
        return isinstance(instance, list)
    if kind == "string":
        return isinstance(instance, str)
    if kind == "boolean":
        return isinstance(instance, bool)
    if kind == "null":
        return instance is None
    if isinstance(instance, bool):
        return False
    if kind == "integer":
        return isinstance(instance, int) or (isinstance(instance, float) and instance.is_integer())
    if kind == "number":
        return isinstance(instance, numbers.Number)
    raise Unsupported(f"type {kind!r}")


def _unbool(x: Any) -> Any:
    return ("bool", x) if isinstance(x, bool) else x


def _equal(one: Any, two: Any) -> bool:
    """jsonschema's ``equal``: JSON equality, where ``True`` is not ``1``."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return one.keys() == two.keys() and all(_equal(one[k], two[k]) for k in one)
    return bool(_unbool(one) == _unbool(two))


class _Checker:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def ref(self, ref: str) -> Any:
        if not ref.startswith("#/$defs/") or "/" in ref.removeprefix("#/$defs/"):
            raise Unsupported(f"$ref {ref!r}")
        defs = self.root.get("$defs", {})
        name = ref.removeprefix("#/$defs/")
        if name not in defs:
            raise Unsupported(f"$ref {ref!r}")
        return defs[name]

    def valid(self, x: Any, s: Any) -> bool:
        if s is True or s is False:
            return bool(s)
        if not isinstance(s, Mapping):
            raise Unsupported(f"schema {s!r}")
        for key, v in s.items():
            if key in _ANNOTATIONS:
                continue
            if key == "type":
                kinds = [v] if isinstance(v, str) else list(v)
                if not any(_is_type(x, k) for k in kinds):
                    return False
            elif key == "$ref":
                if not self.valid(x, self.ref(v)):
                    return False
            elif key == "properties":
                if isinstance(x, dict) and not all(self.valid(x[k], sub) for k, sub in v.items() if k in x):
                    return False
            elif key == "additionalProperties":
                if isinstance(x, dict):
                    known = s.get("properties", {})
                    if not all(self.valid(x[k], v) for k in x if k not in known):
                        return False
            elif key == "required":
                if isinstance(x, dict) and not all(k in x for k in v):
                    return False
            elif key == "if":
                if "then" in s and self.valid(x, v) and not self.valid(x, s["then"]):
                    return False
                if "else" in s:
                    raise Unsupported("else")
            elif key == "allOf":
                if not all(self.valid(x, sub) for sub in v):
                    return False
            elif key == "anyOf":
                if not any(self.valid(x, sub) for sub in v):
                    return False
            elif key == "enum":
                if not any(_equal(e, x) for e in v):
                    return False
            elif key == "const":
                if not _equal(x, v):
                    return False
            elif key == "pattern":
                if isinstance(x, str) and not re.search(v, x):
                    return False
            elif key == "minLength":
                if isinstance(x, str) and len(x) < v:
                    return False
            elif key == "maxLength":
                if isinstance(x, str) and len(x) > v:
                    return False
            elif key in ("minimum", "maximum", "exclusiveMinimum"):
                if _is_type(x, "number") and ((key == "minimum" and x < v) or (key == "maximum" and x > v)
                                              or (key == "exclusiveMinimum" and x <= v)):
                    return False
            elif key == "items":
                if isinstance(x, list) and not all(self.valid(item, v) for item in x):
                    return False
            elif key == "minItems":
                if isinstance(x, list) and len(x) < v:
                    return False
            elif key == "maxItems":
                if isinstance(x, list) and len(x) > v:
                    return False
            else:
                raise Unsupported(key)
        return True


def conforms(data: Any, schema: Mapping[str, Any]) -> bool:
    """True when ``data`` is valid against ``schema`` (as jsonschema's Draft202012Validator would
    say); False when it is not, or when the schema needs a keyword not implemented here."""
    try:
        return _Checker(schema).valid(data, schema)
    except Unsupported:
        return False
    except (TypeError, re.error, RecursionError):  # a schema of an unexpected shape: let jsonschema say
        return False

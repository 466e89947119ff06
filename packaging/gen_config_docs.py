#!/usr/bin/env python3
"""Generate docs/configuration.md and packaging/agent.toml from the config model.

Both are derived from ``agent.runtime.config.Settings``: every key, its type, its default and
the comment written above the field in the source, so neither can drift from the code.
tests/test_docs.py regenerates them and fails when the committed files differ.

    python packaging/gen_config_docs.py            # rewrite both files
    python packaging/gen_config_docs.py --check    # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

TOP = Path(__file__).resolve().parents[1]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from agent.runtime.config import ENV_PREFIX, Settings  # noqa: E402 - needs the path above
from agent.runtime.reload import policy  # noqa: E402

DOC = TOP / "docs" / "configuration.md"
EXAMPLE = TOP / "packaging" / "agent.toml"

# Extra words for the shipped example only (the model's comments are written for developers).
EXAMPLE_NOTES: dict[str, str] = {
    "node.id": "Empty: the host name, with characters outside [A-Za-z0-9_.-] replaced by '-'.",
    "paths.state_dir": (
        "Under systemd this is StateDirectory= (/var/lib/heald). Run unprivileged from a shell, "
        "heald falls back to $XDG_STATE_HOME/heald when this is not writable; "
        "HEALD_PATHS__STATE_DIR=/some/dir overrides it."),
    "mqtt.enabled": "Off in the example: `heald run` then needs no broker and heals locally.",
    "mqtt.password_file": "A file holding only the password (mode 0640 root:heald).",
    "prometheus.listen": "Loopback by default; the endpoint has no authentication.",
    "playbooks.use_helper_units": (
        "Set in the shipped file: heald.service runs as user heald without CAP_SYS_ADMIN, so "
        "dropping caches and GPU resets must go through heald-action@.service."),
}

# Keys the shipped example sets (uncommented) to something other than the model's default.
EXAMPLE_SET: dict[str, object] = {
    "playbooks.use_helper_units": True,
}


@dataclass(frozen=True)
class Field:
    key: str  # dotted
    type_text: str
    default: Any  # msgspec.NODEFAULT when required
    comment: str


@dataclass(frozen=True)
class Section:
    key: str  # dotted table name, "" for the root
    doc: str
    fields: list[Field]
    array_of: bool = False  # [[key]] array of tables


def _struct(tp: Any) -> type[msgspec.Struct] | None:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    return None


def _array_struct(tp: Any) -> type[msgspec.Struct] | None:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if len(args) == 1:
            return _struct(args[0])
    return None


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def type_text(tp: Any) -> str:
    """A short human description of a field's type and constraints."""
    if get_origin(tp) is Annotated:
        base, *metas = get_args(tp)
        text = type_text(base)
        bounds = []
        for meta in metas:
            if not isinstance(meta, msgspec.Meta):
                continue
            for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
                value = getattr(meta, attr)
                if value is not None:
                    bounds.append(f"{sym} {_num(value)}")
            if meta.pattern is not None:
                bounds.append(f"matching `{meta.pattern}`")
        return f"{text} ({', '.join(bounds)})" if bounds else text
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(type_text(a) for a in args)
        return f"{inner}, optional" if len(args) < len(get_args(tp)) else inner
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        sub = _struct(args[0]) if len(args) == 1 else None
        if sub is not None:
            return "array of tables"
        return f"array of {type_text(args[0])}" if len(args) == 1 else "array"
    if origin is dict:
        k, v = get_args(tp)
        return f"table of {type_text(k)} → {type_text(v)}"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if isinstance(tp, type) and tp in names:
        return names[tp]
    if _struct(tp) is not None:
        return "table"
    return str(tp)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment block above it (or at the end of its line), from the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        block: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            block.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        line = lines[node.lineno - 1]
        if "#" in line and node.end_lineno == node.lineno:
            tail = line.split("#", 1)[1].strip()
            if tail and not tail.startswith(("noqa", "type:")):
                block.append(tail)
        if block:
            out[node.target.id] = " ".join(block)
    return out


def _comment(cls: type[msgspec.Struct], name: str) -> str:
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, msgspec.Struct) and klass is not msgspec.Struct:
            text = _comments(klass).get(name)
            if text:
                return text
    return ""


def _default(f: msgspec.structs.FieldInfo) -> Any:
    if f.default is not msgspec.NODEFAULT:
        return f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return f.default_factory()
    return msgspec.NODEFAULT


def walk(cls: type[msgspec.Struct] = Settings, prefix: str = "", array_of: bool = False) -> list[Section]:
    """Every table of the model, depth first, in declaration order."""
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    own: list[Field] = []
    nested: list[Section] = []
    for f in msgspec.structs.fields(cls):
        dotted = f"{prefix}{f.name}"
        sub = _struct(f.type)
        if sub is not None:
            nested.extend(walk(sub, dotted + "."))
            continue
        arr = _array_struct(f.type)
        if arr is not None:
            nested.extend(walk(arr, dotted + ".", array_of=True))
        own.append(Field(dotted, type_text(f.type), _default(f), _comment(cls, f.name)))
    return [Section(prefix.rstrip("."), doc or "", own, array_of), *nested]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, msgspec.Struct):
        return toml_value(msgspec.to_builtins(v))
    raise TypeError(f"no TOML form for {v!r}")


def env_name(dotted: str) -> str:
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def render_markdown(sections: list[Section]) -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by packaging/gen_config_docs.py from agent/runtime/config.py and the stage",
        "     settings modules. Do not edit: change the comment above the field and regenerate. -->",
        "",
        "heald reads `/etc/heald/agent.toml` (or `--config PATH`, or `$HEALD_CONFIG`), then",
        "`conf.d/*.toml` beside it in name order, then environment variables",
        "`HEALD_<SECTION>__<KEY>` (values are read as TOML when they parse, else as strings:",
        "`HEALD_COLLECT__CPU__INTERVAL_S=2`, `HEALD_MQTT__ENABLED=true`). Later sources win.",
        "Unknown keys are errors; `heald check` lists every problem with file, line and key.",
        "`SIGHUP` (`systemctl reload heald`) reloads; an invalid file is refused and the running",
        "configuration kept. A reload applies every key live except those marked **restart** below:",
        "those keep their running value, and the reload logs `reload.restart_required` naming them",
        "(`heald check` lists them too).",
        "",
        "The shipped, commented example with every default is `packaging/agent.toml`",
        "(installed as `/etc/heald/agent.toml`). Metrics exposed by `[prometheus]` are listed in",
        "[metrics.md](metrics.md).",
        "",
    ]
    for s in sections:
        if not s.fields:
            continue
        title = "(top level)" if not s.key else (f"[[{s.key}]]" if s.array_of else f"[{s.key}]")
        out += [f"## `{title}`", ""]
        if s.doc:
            out += [s.doc, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in s.fields:
            name = f.key.rsplit(".", 1)[-1]
            default = "*(required)*" if f.default is msgspec.NODEFAULT else (
                "*(not set)*" if f.default is None else f"`{toml_value(f.default)}`")
            if f.type_text == "array of tables":
                default = "*(none)*" if not f.default else default
            desc = f.comment
            if policy(f.key) == "restart":
                desc = (desc + " " if desc else "") + "**restart** to change."
            if not s.array_of:
                desc = (desc + " " if desc else "") + f"Env: `{env_name(f.key)}`."
            cells = [f"`{name}`", f.type_text, default, desc]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _wrap_comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=94 - len(indent))]


def render_example(sections: list[Section]) -> str:
    out = [
        "# /etc/heald/agent.toml -- heald agent configuration.",
        "#",
        "# GENERATED by packaging/gen_config_docs.py from the config model; every key is shown",
        "# commented out with its default, so this file as shipped means \"all defaults\".",
        "# Uncomment and change what you need, or better, leave this file alone and put your",
        "# changes in /etc/heald/conf.d/*.toml (merged in name order), which package upgrades",
        "# never touch. Environment variables HEALD_<SECTION>__<KEY> override both.",
        "# Check your edits with `heald check`; apply them with `systemctl reload heald`.",
        "# Reference: /usr/share/doc/heald/configuration.md",
    ]
    for s in sections:
        if not s.key or not s.fields:
            continue
        out.append("")
        if s.array_of:
            out += _wrap_comment(s.doc or f"[[{s.key}]] entries") if s.doc else []
            example = "\n".join(f"{f.key.rsplit('.', 1)[-1]} = ..." for f in s.fields)
            out.append(f"# [[{s.key}]]")
            out += [f"# {line}" for line in example.splitlines()]
            continue
        if s.doc:
            out += _wrap_comment(s.doc)
        out.append(f"[{s.key}]")
        for f in s.fields:
            name = f.key.rsplit(".", 1)[-1]
            if f.type_text == "array of tables":
                continue
            text = f.comment
            note = EXAMPLE_NOTES.get(f.key)
            if note:
                text = f"{text} {note}".strip()
            out += _wrap_comment(f"{text} [{f.type_text}]" if text else f"[{f.type_text}]")
            if f.key in EXAMPLE_SET:
                out.append(f"{name} = {toml_value(EXAMPLE_SET[f.key])}")
            elif f.default is None:
                out.append(f"# {name} =   (not set)")
            else:
                out.append(f"# {name} = {toml_value(f.default)}")
    return "\n".join(out).rstrip() + "\n"


def generate() -> dict[Path, str]:
    sections = walk()
    return {DOC: render_markdown(sections), EXAMPLE: render_example(sections)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generate().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        verb = "out of date" if args.check else "rewrote"
        print(f"{verb}: {path.relative_to(TOP)}", file=sys.stderr)  # noqa: T201 - a script's report
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

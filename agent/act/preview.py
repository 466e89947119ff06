"""What a playbook's steps would act on, in words, for an operator deciding an approval.

An approval request that says only "runaway-cpu wants to run" leaves the operator guessing which
process would be stopped. :func:`acts_on` reads the steps' targets against the latest sample
(the processes collector's ``top_cpu``/``top_mem`` lists) and names them:
``stop_process: stress-ng (pid 4242, 97% CPU)``. It is a preview: the run resolves its targets
again when it starts (and refuses protected processes then, as always). Cheap and synchronous:
it runs on the per-sample path, reads no /proc and never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from agent.decide.model import Playbook

#: At most this many characters: it travels in a wire label.
MAX_CHARS: Final = 512
#: Step params that name what a non-process step acts on.
_NAMED_PARAMS: Final = ("unit", "paths", "on_mount", "mount", "path", "gpu", "interface", "service")


def _fill(value: object, bindings: Mapping[str, str]) -> str:
    """``value`` as text with the match's ``{var}`` bindings filled in (unknown ones left as they are)."""
    text = ", ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    for var, bound in bindings.items():
        text = text.replace("{" + var + "}", bound)
    return text


def _mib(value: object) -> str:
    return f"{float(value) / 2**20:.0f} MiB" if isinstance(value, int | float) else "?"


def _top(detail: Mapping[str, Any], which: str) -> str:
    rows = (detail.get("processes") or {}).get("top_cpu" if which == "cpu" else "top_mem") or []
    if not rows or not isinstance(rows[0], Mapping):
        return f"the top {which} process (none seen in the latest sample)"
    row = rows[0]
    if which == "cpu":
        use = f"{float(row.get('cpu_pct') or 0):.0f}% CPU"
    else:
        use = f"{_mib(row.get('rss_bytes'))} RSS"
    return f"{row.get('name', '?')} (pid {row.get('pid', '?')}, {use}, top {which} now)"


def _process_target(target: Mapping[str, Any], bindings: Mapping[str, str], detail: Mapping[str, Any]) -> str:
    if target.get("top") in ("cpu", "mem", "memory"):
        return _top(detail, "cpu" if target["top"] == "cpu" else "mem")
    for key, words in (("pid", "pid {}"), ("unit", "the main process of {}"), ("name", "processes named {}"),
                       ("cmdline", "processes whose command line matches {}"), ("cgroup", "cgroup {}"),
                       ("zombie_parent", "the parents of zombie processes")):
        if key in target:
            return words.format(_fill(target[key], bindings))
    return "processes chosen when the run starts"


def acts_on(playbook: Playbook, bindings: Mapping[str, str], detail: Mapping[str, Any]) -> str:
    """One line: each step's action and what it would act on (steps without a named target are
    left out); "" when no step names one."""
    parts: list[str] = []
    try:
        for step in playbook.steps:
            params = step.params or {}
            target = params.get("target")
            if isinstance(target, Mapping):
                parts.append(f"{step.action}: {_process_target(target, bindings, detail)}")
                continue
            named = [f"{k}={_fill(params[k], bindings)}" for k in _NAMED_PARAMS if k in params]
            if named:
                parts.append(f"{step.action}: {' '.join(named)}")
    except (TypeError, ValueError, AttributeError):  # a preview never stops the approval request
        return "; ".join(parts)[:MAX_CHARS]
    return "; ".join(parts)[:MAX_CHARS]

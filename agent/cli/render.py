"""Human and JSON renderings of a Sample (``heald once``)."""

from __future__ import annotations

import msgspec

from agent.collect.sample import Sample, split_key

_UNITS = (
    ("_pct", "%"), ("_per_s", "/s"), ("_ms", "ms"), ("_c", "°C"), ("_w", "W"), ("_mhz", "MHz"),
)


def format_value(metric_key: str, value: float | None) -> str:
    if value is None:
        return "-"
    family, _ = split_key(metric_key)
    if family.endswith(("_bytes", "_bytes_per_s")):
        suffix = "/s" if family.endswith("_per_s") else ""
        v = float(value)
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or unit == "TiB":
                return f"{v:.0f} {unit}{suffix}" if unit == "B" else f"{v:.1f} {unit}{suffix}"
            v /= 1024
    for end, unit in _UNITS:
        if family.endswith(end):
            return f"{value:.1f} {unit}"
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.3f}"


def render_sample(sample: Sample) -> str:
    lines = [f"node {sample.node}  seq {sample.seq}  wall {sample.wall:.3f}", ""]
    lines.append(f"{'COLLECTOR':<12} {'STATUS':<9} {'PASS':>8}  REASON")
    for name, st in sample.collectors.items():
        ms = f"{st.duration_ms:.1f}ms" if st.duration_ms is not None else "-"
        lines.append(f"{name:<12} {st.status:<9} {ms:>8}  {st.reason}")
    groups: dict[str, list[str]] = {}
    for k in sorted(sample.metrics):
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    width = max((len(k) for k in sample.metrics), default=10)
    for group, keys in groups.items():
        lines += ["", f"[{group}]"]
        lines.extend(f"  {k:<{width}}  {format_value(k, sample.metrics[k]):>14}" for k in keys)
    if sample.events:
        lines += ["", "[events]"]
        lines.extend(f"  {e.kind} {e.labels} {e.value if e.value is not None else ''} {e.message}"
                     for e in sample.events)
    for name, detail in sample.detail.items():
        lines += ["", f"[{name} detail]"]
        for k, v in detail.items():
            lines.append(f"  {k}: {v}")
    return "\n".join(lines) + "\n"


def sample_json(sample: Sample) -> str:
    return msgspec.json.encode(sample).decode()

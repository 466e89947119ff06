#!/usr/bin/env bash
# heald on a real NVIDIA GPU (issue 24): one prepared run, under 8 minutes.
#
#   bash bench/gpu_device_check.sh        # from the repository root, on a host with a GPU
#
# 1. the GPU and the driver (nvidia-smi), 2. `heald once --json`: every gpu.* family present for
# every GPU, xid_source "nvml", 3. the GPU collector for 60 s: no exception, per-pass cost in us,
# the XID event set answers promptly (0 ms wait), 4. `heald run --dry-run` for 2 minutes with
# /metrics on, then the heald_gpu_* series. It only reads: it never resets, drains or
# reconfigures a GPU (dry-run acts on nothing; no nvidia-smi option that changes state is used).
# Output: stdout and bench/results/gpu_device_check-<date>.txt. Without a GPU it stops at once:
# one line on stderr, exit 2, nothing installed or written.
set -euo pipefail

die() { echo "gpu_device_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU here (no nvidia-smi on PATH); nothing run"
gpus=$(nvidia-smi -L 2>/dev/null) || die "no NVIDIA GPU here (nvidia-smi -L failed); nothing run"
grep -q '^GPU ' <<<"$gpus" || die "no NVIDIA GPU here (nvidia-smi -L lists none); nothing run"

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
day=$(date -u +%Y-%m-%d)
out="bench/results/gpu_device_check-$day.txt"
work=$(mktemp -d)
run_pid=""
cleanup() {
    if [[ -n "$run_pid" ]] && kill -0 "$run_pid" 2>/dev/null; then kill -TERM "$run_pid"; wait "$run_pid" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p bench/results
exec > >(tee "$out") 2>&1

echo "# heald GPU device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm)"
echo "## 1. GPU and driver"
nvidia-smi --query-gpu=index,name,driver_version,pci.bus_id,uuid,mig.mode.current,ecc.mode.current --format=csv
"$PY" -c 'import pynvml' 2>/dev/null || timeout 120 "$PY" -m pip install -q nvidia-ml-py
"$PY" -c 'import agent' 2>/dev/null || timeout 180 "$PY" -m pip install -q -e .
"$PY" -c 'import pynvml; print("nvidia-ml-py", getattr(pynvml, "__version__", "?"))'

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/agent.toml" <<TOML
[node]
id = "gpu-check"
[paths]
state_dir = "$work/state"
runtime_dir = "$work/run"
[collect.gpu]
enabled = true
interval_s = 1.0
[mqtt]
enabled = false
[prometheus]
enabled = true
listen = "127.0.0.1:$port"
[playbooks]
force_mode = "dry-run"
TOML

echo "## 2. heald once --json"
timeout 60 "$PY" -m agent once --json --config "$work/agent.toml" > "$work/once.json"
"$PY" - "$work/once.json" <<'PYEOF'
import json, sys
from agent.collect.families import METRIC_FAMILIES
from agent.collect.sample import split_key
s = json.load(open(sys.argv[1]))
metrics, detail = s["metrics"], s.get("detail", {}).get("gpu", {})
devices = detail.get("devices", {})
print("devices:", json.dumps(devices))
print("xid_source:", detail.get("xid_source"))
by_gpu: dict[str, set[str]] = {}
for k, v in metrics.items():
    fam, lbl = split_key(k)
    if fam.startswith("gpu.") and lbl in devices:
        by_gpu.setdefault(lbl, set()).add(fam)
want = {f for f in METRIC_FAMILIES if f.startswith("gpu.") and not f.startswith("gpu.mig_mem")}
bad = detail.get("xid_source") != "nvml" or not devices
for gpu in devices:
    missing = sorted(want - by_gpu.get(gpu, set()))
    nones = sorted(k for k, v in metrics.items() if v is None and k.endswith(f"[{gpu}]"))
    print(f"GPU {gpu}: {len(by_gpu.get(gpu, ()))} gpu.* families; absent (not supported here): {missing}; None: {nones}")
print("RESULT once:", "FAIL" if bad else "ok")
sys.exit(1 if bad else 0)
PYEOF

echo "## 3. the GPU collector for 60 s"
timeout 120 "$PY" - <<'PYEOF'
import statistics, time
import pynvml
from agent.collect import gpu_xid
from agent.collect.gpu import GpuCollector
from agent.collect.settings import GpuSettings
c = GpuCollector(GpuSettings())
c.start()
costs, waits, events, t_end = [], [], 0, time.monotonic() + 60
while time.monotonic() < t_end:
    t0 = time.perf_counter()
    r = c.collect()
    costs.append((time.perf_counter() - t0) * 1e6)
    events += len(r.events)
    if c._event_set is not None:
        t0 = time.perf_counter()
        gpu_xid.poll_event_set(pynvml, c._event_set, c._xid_mask)
        waits.append((time.perf_counter() - t0) * 1e6)
    time.sleep(0.2)
c.close()
q = statistics.quantiles(costs, n=20)
print(f"passes {len(costs)}, events {events}; per pass us: p50 {statistics.median(costs):.0f} p95 {q[18]:.0f} max {max(costs):.0f}")
if waits:
    print(f"event set poll (0 ms wait) us: p50 {statistics.median(waits):.0f} max {max(waits):.0f}")
ok = bool(waits) and max(waits) < 50_000
print("RESULT collector:", "ok" if ok else "FAIL (no NVML event set, or a poll took over 50 ms)")
raise SystemExit(0 if ok else 1)
PYEOF

echo "## 4. heald run --dry-run for 2 minutes, /metrics on 127.0.0.1:$port"
"$PY" -m agent run --dry-run --config "$work/agent.toml" > "$work/run.log" 2>&1 &
run_pid=$!
sleep 120
kill -0 "$run_pid" || { tail -20 "$work/run.log"; echo "RESULT run: FAIL (heald run exited)"; exit 1; }
"$PY" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=10).read().decode())" \
    > "$work/metrics.txt"
grep -E '^heald_gpu_' "$work/metrics.txt" || true
kill -TERM "$run_pid"; wait "$run_pid" || true; run_pid=""
grep -qiE '"level": ?"(error|critical)"|Traceback' "$work/run.log" && { grep -iE 'error|Traceback' "$work/run.log" | head -20; echo "RESULT run: FAIL"; exit 1; }
n=$(grep -c '^heald_gpu_' "$work/metrics.txt" || true)
[[ "$n" -gt 0 ]] || { echo "RESULT run: FAIL (no heald_gpu_* series)"; exit 1; }
echo "RESULT run: ok ($n heald_gpu_* series)"
echo "# all ok; written to $out"

"""Two commits of the product, one behaviour: the score stage replayed on kept runs, byte for byte.

    python3 bench/same_behaviour.py OLD NEW [--run RUN ...] [--limit N] [--smoke]

The fault-free count (``bench/faultfree_load.py --combine``) adds up only runs of one product tree:
any commit to ``agent/``, ``remediations/`` or ``pyproject.toml`` starts a new count, also one that
changes no behaviour (a file shortened for the 600-line rule, a comment). This script is the one
way such a commit keeps a count: it shows that the two commits answer every kept sample alike.

For each commit the product paths are taken from git as committed (``git archive``) into a
temporary directory; the native kernels (``agent/native/libheald_kernels.so``, not in git) are
copied in when that commit's C sources equal this checkout's, from which the library was built.
For each kept run of ``bench/faultfree_load.py --samples`` (default: every kept run), a child
Python with only that tree on its path (``PYTHONPATH``; it checks that ``agent`` came from there)
feeds the run's samples, in order, through the daemon's score stage
(``agent.score.stage.RiskStage`` with its shipped classifier, forecaster and evidence gates; no
anomaly detector: ``history=False``, cold start never ends) and hashes every ``Risk`` it returns
(msgpack of every field: failure probabilities, forecasts with ETA, confidence and rate, the
alert flag). Both the native and the numpy path (``HEALD_KERNELS=0``) where the kernels could be
copied, the numpy path alone otherwise.

Same behaviour is shown when every run's hashes are equal on both paths AND every product file
that differs between the two commits was loaded by the replay (a changed file the score stage
never loads, a playbook, ``pyproject.toml``, the detector, is not shown by it: the verdict is then
"not shown"). The record is kept in ``bench/results/faultfree_load/same/OLDTREE-NEWTREE.json``
(``--smoke``: OLD and NEW are HEAD, one run's first 300 samples, nothing kept); ``faultfree_load.py
--combine`` then counts the runs of the old tree with the new one's, and says so.

Exit: 0 same behaviour, 1 differs or not shown (the first differing run and sample are printed),
2 bad input (one line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import faultfree_load as ffl  # noqa: E402

SAME = ffl.RUNS / "same"
LIB = Path("agent") / "native" / "libheald_kernels.so"

# Runs in a child interpreter whose path holds only the extracted tree (and the site packages).
CHILD = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
import msgspec
tree, samples_path, out_path = (Path(a).resolve() for a in sys.argv[1:4])
limit = int(sys.argv[4])
import agent
if not Path(agent.__file__).resolve().is_relative_to(tree):
    sys.exit(f"agent was imported from {agent.__file__}, not from {tree}")
from agent.decide.replay import samples
from agent.native import kernels
from agent.score.settings import ModelSettings
from agent.score.stage import RiskStage
digests, alerts = [], 0
whole = hashlib.sha256()
with tempfile.TemporaryDirectory(prefix="heald-same-") as tmp:
    stage = RiskStage(ModelSettings(cold_start_s=1e12), Path(tmp) / "state", history=False)
    for k, smp in enumerate(sorted(samples(samples_path), key=lambda x: x.seq)):
        if limit and k >= limit:
            break
        risk = stage.on_sample(smp)
        b = msgspec.msgpack.encode(risk)
        whole.update(len(b).to_bytes(4, "big") + b)
        digests.append([smp.seq, hashlib.sha256(b).hexdigest()[:16]])
        alerts += bool([w for w in stage.risk_alert(risk) if w != "anomaly"])
    stage.close()
files = [Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
loaded = sorted({str(f.relative_to(tree)) for f in files if f.is_relative_to(tree)})
out_path.write_text(json.dumps({"digest": whole.hexdigest(), "samples": len(digests), "alert_samples": alerts,
                                "kernels": kernels() is not None, "loaded": loaded, "per_sample": digests}))
"""


class BadInput(Exception):
    """One line for the operator (exit 2)."""


def git(repo: Path, *a: str, text: bool = True) -> Any:
    proc = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=text, check=False,
                          timeout=120)
    if proc.returncode != 0:
        err = (proc.stderr if text else proc.stderr.decode(errors="replace")).strip()
        raise BadInput(f"git {' '.join(a)}: {err.splitlines()[-1] if err else proc.returncode}")
    return proc.stdout.strip() if text else proc.stdout


def commit_of(repo: Path, rev: str) -> str:
    try:
        return str(git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"))
    except BadInput:
        raise BadInput(f"{rev}: no such commit in {repo}") from None


def tree_of(repo: Path, commit: str) -> str:
    """The product tree id of ``commit`` as ``faultfree_load.product_tree`` names a checkout's."""
    try:
        return ffl.tree_id(commit, repo)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BadInput(f"{commit}: no product tree ({', '.join(ffl.PRODUCT_PATHS)}) in {repo}") from exc


def changed_files(repo: Path, old: str, new: str) -> list[str]:
    out = str(git(repo, "diff", "--name-only", old, new, "--", *ffl.PRODUCT_PATHS))
    return [line for line in out.splitlines() if line]


def extract(repo: Path, commit: str, dest: Path) -> bool:
    """The committed product paths of ``commit`` under ``dest``; True when the native kernels
    could be copied in (that commit's C sources are this checkout's, which built them)."""
    dest.mkdir(parents=True)
    tar = git(repo, "archive", "--format=tar", commit, *ffl.PRODUCT_PATHS, text=False)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True, timeout=120)
    lib = ROOT / LIB
    if not lib.is_file():
        return False
    for src in sorted((dest / "agent" / "native").glob("*")):
        ours = ROOT / "agent" / "native" / src.name
        if src.suffix in (".c", ".h") and (not ours.is_file() or ours.read_bytes() != src.read_bytes()):
            return False
    shutil.copy2(lib, dest / LIB)
    return True


def replay(tree: Path, samples: Path, native: bool, limit: int, work: Path) -> dict[str, Any]:
    fd, name = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    out = Path(name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(tree), HEALD_KERNELS="1" if native else "0", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(samples), str(out), str(limit)],
                          cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise BadInput(f"the replay of {samples.name} on {tree.name} failed: {tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    if native and not result["kernels"]:
        raise BadInput(f"the native kernels copied into {tree.name} did not load "
                       "(a stale build? pip install -e .)")
    return result


def kept_runs(names: list[str] | None) -> list[tuple[str, Path]]:
    if names:
        runs = []
        for n in names:
            meta = Path(n) if n.endswith(".json.gz") else ffl.RUNS / f"{n}.json.gz"
            runs.append(meta)
    else:
        runs = sorted(ffl.RUNS.glob("*.json.gz"))
    out = []
    for meta in runs:
        name = meta.name.removesuffix(".json.gz")
        smp = meta.with_name(name + ".samples.jsonl.gz")
        if not smp.is_file():
            if names:
                raise BadInput(f"{smp}: no such kept samples (a run kept with --samples)")
            continue
        out.append((name, smp))
    if not out:
        raise BadInput(f"no kept run with samples in {ffl.RUNS}")
    return out


def compare(repo: Path, old_rev: str, new_rev: str, runs: list[tuple[str, Path]], *, limit: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """The record: both commits' trees, the changed files, per run and path the digests, the verdict."""
    old, new = commit_of(repo, old_rev), commit_of(repo, new_rev)
    rec: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "release": platform.release()},
        "old": {"commit": old, "tree": tree_of(repo, old)},
        "new": {"commit": new, "tree": tree_of(repo, new)},
        "changed": changed_files(repo, old, new), "limit": limit, "runs": []}
    loaded: set[str] = set()
    first_diff = None
    with tempfile.TemporaryDirectory(prefix="heald-same-") as tmp:
        work = Path(tmp)
        trees = {"old": work / "old", "new": work / "new"}
        native = all([extract(repo, old, trees["old"]), extract(repo, new, trees["new"])])
        paths = [True, False] if native else [False]
        for name, smp in runs:
            plain = work / (name + ".jsonl")
            plain.write_bytes(gzip.decompress(smp.read_bytes()))
            row: dict[str, Any] = {"run": name, "paths": {}}
            for nat in paths:
                res = {k: replay(t, plain, nat, limit, work) for k, t in trees.items()}
                loaded |= set(res["new"]["loaded"]) | set(res["old"]["loaded"])
                same = res["old"]["digest"] == res["new"]["digest"]
                row["samples"] = res["new"]["samples"]
                row["paths"]["native" if nat else "numpy"] = {
                    "same": same, "old": res["old"]["digest"][:16], "new": res["new"]["digest"][:16],
                    "alert_samples": [res["old"]["alert_samples"], res["new"]["alert_samples"]]}
                if not same and first_diff is None:
                    a, b = res["old"]["per_sample"], res["new"]["per_sample"]
                    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                             min(len(a), len(b)))
                    longer = a if len(a) > len(b) else b
                    seq = a[k][0] if k < min(len(a), len(b)) else longer[k][0] if k < len(longer) else None
                    first_diff = {"run": name, "path": "native" if nat else "numpy", "seq": seq}
                if progress:
                    print(f"  {name} ({'native' if nat else 'numpy'}): {row['samples']} samples, "
                          f"{'same' if same else 'DIFFERENT'}", file=sys.stderr, flush=True)
            os.unlink(plain)
            rec["runs"].append(row)
    rec["native"] = native
    rec["not_loaded"] = [f for f in rec["changed"] if f not in loaded]
    rec["first_difference"] = first_diff
    rec["same"] = first_diff is None and not rec["not_loaded"]
    return rec


def table(rec: dict[str, Any]) -> str:
    old, new = rec["old"], rec["new"]
    m = rec["machine"]
    lines = [(f"# python3 bench/same_behaviour.py {old['commit'][:7]} {new['commit'][:7]}: {rec['when']} on "
              f"{m['node']} ({m['cpus']} cpu, {m['release']})"),
             (f"# old {old['commit'][:7]} (product tree {old['tree']}), new {new['commit'][:7]} "
              f"(product tree {new['tree']}); changed product files: {', '.join(rec['changed']) or 'none'}"),
             "", "| kept run | samples | path | old | new | alert samples (old / new) | same |",
             "|---|---|---|---|---|---|---|"]
    for row in rec["runs"]:
        for path, r in row["paths"].items():
            old_n, new_n = r["alert_samples"]
            lines.append(f"| {row['run']} | {row['samples']} | {path} | {r['old']} | {r['new']} | "
                         f"{old_n} / {new_n} | {'yes' if r['same'] else '**no**'} |")
    n = sum(row["samples"] for row in rec["runs"])
    lines.append("")
    if not rec["native"]:
        lines.append("the native kernels could not be copied in (not built, or the C sources differ): "
                     "the numpy path only")
    if rec["not_loaded"]:
        lines.append(f"changed but not loaded by the score stage's replay: {', '.join(rec['not_loaded'])}")
    if rec["first_difference"]:
        d = rec["first_difference"]
        lines.append(f"first difference: run {d['run']}, {d['path']} path, sample seq {d['seq']}")
    verdict = "SAME BEHAVIOUR" if rec["same"] else "DIFFERENT" if rec["first_difference"] else "NOT SHOWN"
    lines.append(f"{verdict}: every Risk of the score stage on {n} samples of {len(rec['runs'])} kept run(s) "
                 f"{'identical' if not rec['first_difference'] else 'compared'} "
                 f"({'native and numpy paths' if rec['native'] else 'numpy path'})")
    return "\n".join(lines)


def record_path(rec: dict[str, Any]) -> Path:
    return SAME / f"{rec['old']['tree']}-{rec['new']['tree']}.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", nargs="?", default="HEAD", help="the commit whose runs were counted")
    ap.add_argument("new", nargs="?", default="HEAD", help="the commit that should count with them")
    ap.add_argument("--run", action="append", help="a kept run (name or .json.gz); default every kept run")
    ap.add_argument("--limit", type=int, default=0, help="only the first N samples of each run (0: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="HEAD against HEAD, one run, 300 samples, nothing kept")
    args = ap.parse_args()
    try:
        runs = kept_runs(args.run)
        if args.smoke:
            args.old = args.new = "HEAD"
            runs, args.limit = runs[:1], args.limit or 300
        rec = compare(ROOT, args.old, args.new, runs, limit=args.limit)
    except BadInput as exc:
        print(f"same_behaviour: {exc}", file=sys.stderr)
        return 2
    text = table(rec)
    print(text, flush=True)
    if not args.smoke and not args.limit:
        SAME.mkdir(parents=True, exist_ok=True)
        record_path(rec).write_text(json.dumps(rec, indent=1) + "\n")
        print(f"kept: {record_path(rec).relative_to(ROOT)}")
    return 0 if rec["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

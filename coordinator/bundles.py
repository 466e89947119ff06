"""The bundle registry and its rollout: publish, shadow, promote (canary or fleet), roll back.

Bundles live in ``<state_dir>/bundles/<version>.json`` (files, SHA-256, the signature by this
replica's command key, publisher, reason, when); ``rollout.json`` holds the fleet's live version,
the ones before it, the shadow and the running canary. A bundle reaches a node as signed
``bundle_chunk`` commands (:mod:`agent.wire.bundles`), then a ``bundle_activate`` switches a role.

A canary makes a candidate live on some nodes for ``window_s`` seconds. :meth:`Rollout.watch`
compares the playbook runs per hour of the canary nodes (since the canary began) with those of the
other nodes; beyond ``margin_per_h`` the canary nodes go back to the live version at once. Every
step is a row of the coordinator's audit chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.wire import CommandName
from agent.wire import bundles as wb
from coordinator.errors import BadRequest, NotFound
from coordinator.store.queries import NodeQuery

if TYPE_CHECKING:
    from coordinator.replica import Coordinator

log = structlog.get_logger("coordinator.bundles")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Rollout:
    def __init__(self, coord: Coordinator, root: Path | None = None) -> None:
        self.coord = coord
        self.root = root or Path(coord.settings.state_dir) / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ registry

    def _path(self, version: str) -> Path:
        try:
            return self.root / f"{wb.check_version(version)}.json"
        except wb.BundleError as exc:
            raise BadRequest(str(exc)) from None

    def get(self, version: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._path(version).read_text())
        except FileNotFoundError:
            raise NotFound(f"no bundle {version}") from None
        return data

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / "rollout.json").read_text())
        except (OSError, ValueError):
            data = {}
        return {"live": "", "history": [], "shadow": "", "canary": None, "last_canary": None} | data

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write(self.root / "rollout.json", json.dumps(state).encode())

    def listing(self) -> dict[str, Any]:
        items = []
        for p in sorted(self.root.glob("*.json")):
            if p.name != "rollout.json":
                meta = json.loads(p.read_text())
                meta.pop("files", None)
                items.append(meta)
        items.sort(key=lambda m: float(m.get("published") or 0))
        return {"items": items, "state": self.state()}

    async def publish(self, version: str, files: dict[str, str], actor: str, reason: str) -> dict[str, Any]:
        path = self._path(version)
        if path.exists():
            raise BadRequest(f"bundle {version} exists (versions are immutable: publish a new one)")
        try:
            data = wb.pack(files)
        except wb.BundleError as exc:
            raise BadRequest(str(exc)) from None
        sha = wb.digest(data)
        signature = wb.sign(self.coord.signer.private_key, version, sha)
        meta = {"version": version, "sha256": sha, "signature": signature,
                "publisher": actor, "reason": reason, "published": time.time(), "files": wb.unpack(data)}
        atomic_write(path, json.dumps(meta).encode())
        await self.coord.store.audit(actor, "bundle.publish", "", {"bundle": version, "sha256": sha,
                                                                   "reason": reason, "files": sorted(files)})
        log.info("bundle published", bundle=version, sha256=sha, by=actor)
        return {k: v for k, v in meta.items() if k != "files"}

    # ------------------------------------------------------------------ sending

    async def nodes(self) -> list[str]:
        page = await self.coord.store.list_nodes(NodeQuery(sort="node", descending=False, limit=10_000))
        return [n["node"] for n in page["items"]]

    async def _send(self, node: str, name: str, args: dict[str, Any], actor: str) -> None:
        site = await self.coord.store.node_site(node)
        cmd = self.coord.signer.make(node=node, site=site, name=name, args={**args, "by": actor})
        await self.coord.store.issue_command(cmd, actor, name)
        await self.coord.bus.publish(cmd)

    async def push(self, version: str, nodes: list[str], actor: str) -> None:
        """Send every chunk of ``version`` to ``nodes`` (a node keeps what it already has)."""
        if not version:
            return
        meta = self.get(version)
        pieces = wb.chunks(wb.pack(meta["files"]))
        head = {"bundle": version, "sha256": meta["sha256"], "signature": meta["signature"],
                "publisher": meta["publisher"], "reason": meta["reason"][:1000], "total": len(pieces)}
        for node in nodes:
            for index, piece in enumerate(pieces):
                await self._send(node, CommandName.BUNDLE_CHUNK, head | {"index": index, "data": piece},
                                 actor)

    async def activate(self, version: str, role: str, nodes: list[str], actor: str) -> None:
        await self.push(version, nodes, actor)
        for node in nodes:
            await self._send(node, CommandName.BUNDLE_ACTIVATE, {"bundle": version, "role": role}, actor)

    # ------------------------------------------------------------------ operator steps

    async def shadow(self, version: str, actor: str) -> dict[str, Any]:
        if version:
            self.get(version)
        async with self._lock:
            nodes = await self.nodes()
            await self.activate(version, "shadow", nodes, actor)
            state = self.state() | {"shadow": version}
            self._save(state)
        await self.coord.store.audit(actor, "bundle.shadow", "", {"bundle": version, "nodes": nodes})
        return state

    async def promote(self, version: str, actor: str, *, nodes: list[str] | None = None, share: float = 1.0,
                      window_s: float = 3600.0, margin_per_h: float = 10.0) -> dict[str, Any]:
        self.get(version)
        if not 0 < share <= 1 or not 1 <= window_s <= 7 * 86400 or margin_per_h < 0:
            raise BadRequest("share must be in (0, 1], window_s 1..604800, margin_per_h >= 0")
        async with self._lock:
            state = self.state()
            if state["canary"]:
                raise BadRequest(f"a canary of {state['canary']['bundle']} is running: roll it back first")
            fleet = await self.nodes()
            unknown = sorted(set(nodes or []) - set(fleet))
            if unknown:
                raise BadRequest(f"unknown nodes: {', '.join(unknown)}")
            detail: dict[str, object]
            chosen = sorted(nodes) if nodes else fleet[:max(1, round(share * len(fleet)))]
            if set(chosen) == set(fleet):  # the whole fleet: the new live version
                await self.activate(version, "live", fleet, actor)
                if state["live"] != version:
                    state["history"] = [*state["history"], state["live"]][-20:]
                state["live"] = version
                action, detail = "bundle.promote", {"bundle": version, "nodes": fleet}
            else:
                await self.activate(version, "live", chosen, actor)
                state["canary"] = {"bundle": version, "nodes": chosen, "started": time.time(),
                                   "window_s": window_s, "margin_per_h": margin_per_h, "by": actor}
                action, detail = "bundle.canary", {"bundle": version, "nodes": chosen, "window_s": window_s,
                                                   "margin_per_h": margin_per_h}
            self._save(state)
        await self.coord.store.audit(actor, action, "", detail)
        return state

    async def rollback(self, actor: str, reason: str = "operator") -> dict[str, Any]:
        async with self._lock:
            state = self.state()
            canary = state["canary"]
            if canary:  # the canary nodes go back to the fleet's live version
                await self.activate(state["live"], "live", canary["nodes"], actor)
                state["canary"], state["last_canary"] = None, canary | {"rolled_back": time.time(),
                                                                        "reason": reason}
                detail: dict[str, Any] = {"bundle": canary["bundle"], "to": state["live"],
                                          "nodes": canary["nodes"], "reason": reason}
            elif state["live"] or state["history"]:
                back = state["history"][-1] if state["history"] else ""
                fleet = await self.nodes()
                await self.activate(back, "live", fleet, actor)
                detail = {"bundle": state["live"], "to": back, "nodes": fleet, "reason": reason}
                state["live"], state["history"] = back, state["history"][:-1]
            else:
                raise BadRequest("nothing to roll back: no bundle is live and no canary runs")
            self._save(state)
        await self.coord.store.audit(actor, "bundle.rollback", "", detail)
        log.warning("bundle rolled back", **detail)
        return state

    # ------------------------------------------------------------------ the canary watch

    async def _runs_per_h(self, nodes: list[str], since: float, now: float) -> float:
        if not nodes:
            return 0.0
        marks = ",".join("?" * len(nodes))
        where = f"node IN ({marks}) AND ts >= ? AND step != 'control'"  # runs, not commands' records
        rows = await self.coord.store.table("actions", where=where,
                                            params=[*nodes, since], order="id DESC", limit=100_000, offset=0)
        runs = {(r["node"], r.get("run_id")) for r in rows}
        return len(runs) / len(nodes) / max(now - since, 1.0) * 3600.0

    async def judge(self) -> dict[str, Any] | None:
        """Compare a running canary with the rest of the fleet; roll it back beyond its margin."""
        canary = self.state()["canary"]
        if not canary:
            return None
        now = time.time()
        fleet = await self.nodes()
        others = [n for n in fleet if n not in canary["nodes"]]
        cand = await self._runs_per_h(canary["nodes"], canary["started"], now)
        live = await self._runs_per_h(others, canary["started"], now)
        verdict = {"bundle": canary["bundle"], "candidate_runs_per_h": round(cand, 1),
                   "live_runs_per_h": round(live, 1), "margin_per_h": canary["margin_per_h"]}
        if cand > live + canary["margin_per_h"]:
            await self.rollback("canary-watch", reason=f"candidate {cand:.0f} runs/h vs live {live:.0f} "
                                                       f"(margin {canary['margin_per_h']:g})")
            return verdict | {"verdict": "rolled_back"}
        if now - canary["started"] >= canary["window_s"]:
            async with self._lock:
                state = self.state()
                state["canary"], state["last_canary"] = None, canary | {"passed": now}
                self._save(state)
            await self.coord.store.audit("canary-watch", "bundle.canary_passed", "", verdict)
            return verdict | {"verdict": "passed"}
        return verdict | {"verdict": "watching"}

    async def watch(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.judge()
            except Exception:  # the watch outlives one bad pass
                log.exception("canary watch failed")
            await asyncio.sleep(interval_s)

"""``block_address``: drop a source address for a while, in heald's own nftables table.

Everything lives in ``table inet heald`` and nowhere else: two sets with timeouts
(``blocked4``: ipv4_addr, ``blocked6``: ipv6_addr) and one input chain at ``[security]
chain_priority`` (default -200: before the operator's filter chains at 0) that drops packets
from either set. The table is created on first use, in one nft transaction. An element carries
its own timeout (``timeout`` param, else ``[security] block_timeout_s``, default 1 h): the
kernel removes it when it expires, also when heald is gone. Blocking an address already
blocked renews its timeout. The step succeeds only when the element is read back from the set
(``nft -j get element``).

Refused, in dry runs too: anything that is not one IP address, loopback, unspecified and
multicast addresses, the node's own addresses, the MQTT broker's host (``[mqtt] host``, resolved),
and ``[security] allow_list`` (addresses and CIDR networks).

:func:`remove_table` deletes the table (the daemon calls it on stop unless ``[security]
keep_blocks_on_stop``). nft always runs as an argv list; reading uses ``nft -j``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import subprocess
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from agent.act.base import ActionContext, ActionResult
from agent.decide.settings import SecuritySettings
from agent.decide.units import parse_duration

FAMILY = "inet"
TABLE = "heald"
SETS = {4: "blocked4", 6: "blocked6"}
CHAIN = "input"
_NFT_TIMEOUT_S = 10.0
_OUTPUT_LIMIT = 1 << 20
_ELEM_TEXT = re.compile(
    r"elements = \{ (?P<val>[0-9a-fA-F.:]+)"
    r"(?: timeout (?P<timeout>[^\s,}]+))?(?: expires (?P<expires>[^\s,}]+))?")
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}


def nft(settings: SecuritySettings, args: Sequence[str], *, stdin: str | None = None,
        env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``nft ARGS`` (blocking): ``(exit status, output)``; 127 when nft cannot run."""
    argv = [*settings.nft, *args]
    try:
        done = subprocess.run(  # an argv list, never a shell
            argv, input=stdin, capture_output=True, text=True, timeout=_NFT_TIMEOUT_S, check=False,
            env=dict(env) if env is not None else _env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, f"cannot run {argv[0]!r}: {exc}"
    return done.returncode, (done.stdout + done.stderr)[:_OUTPUT_LIMIT]


def table_script(priority: int) -> str:
    """The nft transaction that creates heald's table, sets and reject rules (a blocked source's
    connections are refused at once, ICMP port unreachable / TCP RST, as fail2ban's default
    REJECT: a client that is refused does not keep retrying into a silent drop)."""
    return "\n".join((
        f"add table {FAMILY} {TABLE}",
        f"add set {FAMILY} {TABLE} {SETS[4]} {{ type ipv4_addr; flags timeout; }}",
        f"add set {FAMILY} {TABLE} {SETS[6]} {{ type ipv6_addr; flags timeout; }}",
        (f"add chain {FAMILY} {TABLE} {CHAIN} "
         f"{{ type filter hook input priority {priority}; policy accept; }}"),
        f"add rule {FAMILY} {TABLE} {CHAIN} ip saddr @{SETS[4]} reject",
        f"add rule {FAMILY} {TABLE} {CHAIN} ip6 saddr @{SETS[6]} reject",
        "",
    ))


def _table_complete(listing: str) -> bool:
    """Whether ``nft -j list table inet heald`` shows both sets and both reject rules."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return False
    sets = {i["set"]["name"] for i in items if isinstance(i, dict) and "set" in i}
    rules = [i["rule"] for i in items if isinstance(i, dict) and "rule" in i]
    return set(SETS.values()) <= sets and len(rules) >= 2


def ensure_table(settings: SecuritySettings, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Create heald's table when it is missing or incomplete: ``(ok, what happened)``."""
    rc, out = nft(settings, ["-j", "list", "table", FAMILY, TABLE], env=env)
    if rc == 0 and _table_complete(out):
        return True, "table present"
    script = table_script(settings.chain_priority)
    if rc == 0:  # someone removed a part of it: build it again, in the same transaction
        script = f"delete table {FAMILY} {TABLE}\n" + script
    rc, out = nft(settings, ["-f", "-"], stdin=script, env=env)
    if rc != 0:
        return False, f"cannot create table {FAMILY} {TABLE}: {out.strip()[:300]}"
    return True, "table created"


def remove_table(settings: SecuritySettings) -> bool:
    """Delete ``table inet heald`` if it exists (blocking). True when it was there and is gone."""
    rc, _ = nft(settings, ["list", "table", FAMILY, TABLE])
    if rc != 0:
        return False
    rc, _ = nft(settings, ["delete", "table", FAMILY, TABLE])
    return rc == 0


def element(settings: SecuritySettings, addr: Address,
            env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The set element of ``addr`` (``{"val", "timeout", "expires"}``, as nft writes them) or None
    when it is not in the set. ``nft get element`` exits non-zero for an absent element; nft 1.0.6
    prints text even with ``-j``, so both forms are read."""
    rc, out = nft(settings, ["-j", "get", "element", FAMILY, TABLE, SETS[addr.version], "{", str(addr), "}"],
                  env=env)
    if rc != 0:
        return None
    try:
        items = json.loads(out).get("nftables", [])
    except (ValueError, AttributeError):
        m = _ELEM_TEXT.search(out)
        if m is None or m.group("val") != str(addr):
            return None
        return {"val": m.group("val"), "timeout": m.group("timeout"), "expires": m.group("expires")}
    for item in items:
        for elem in (item.get("set", {}).get("elem", []) if isinstance(item, dict) else []):
            inner = elem.get("elem", elem) if isinstance(elem, dict) else {"val": elem}
            if str(inner.get("val")) == str(addr):
                return {k: f"{v}s" if isinstance(v, int) else v
                        for k, v in ((k, inner.get(k)) for k in ("val", "timeout", "expires"))}
    return None


def _own_addresses() -> set[Address]:
    out: set[Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in {socket.AF_INET, socket.AF_INET6}:
                try:
                    out.add(ipaddress.ip_address(a.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return out


def _resolve(host: str) -> tuple[set[Address], str]:
    try:
        return {ipaddress.ip_address(host.strip("[]"))}, ""
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        return set(), f"broker host {host!r} does not resolve ({exc})"
    out: set[Address] = set()
    for info in infos:
        try:
            out.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return out, ""


def refusal(addr: Address, security: SecuritySettings,
            protected_hosts: Sequence[str]) -> tuple[str, list[str]]:
    """Why ``addr`` must not be blocked ("" when it may be), and notes (an unresolvable broker)."""
    notes: list[str] = []
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
        return f"{addr} is a loopback, unspecified or multicast address", notes
    for entry in security.allow_list:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if addr.version == net.version and addr in net:
            return f"{addr} is in [security] allow_list ({entry})", notes
    for host in protected_hosts:
        found, note = _resolve(host)
        if note:
            notes.append(note)
        if addr in found:
            return f"{addr} is the MQTT broker's address ({host})", notes
    if addr in _own_addresses():
        return f"{addr} is one of this node's own addresses", notes
    return "", notes


def _evidence(addr: str, ctx: ActionContext) -> dict[str, Any]:
    """What made the trigger fire for this source: the counts, the window, the failures by kind."""
    auth = ctx.detail.get("security_net", {}).get("auth", {}) if isinstance(ctx.detail, Mapping) else {}
    src = auth.get("sources", {}).get(addr, {}) if isinstance(auth, Mapping) else {}
    return {"inputs": dict(ctx.inputs), "window_s": auth.get("window_s"), "source": auth.get("source"),
            "failures": src.get("failures"), "recent": src.get("recent"), "kinds": src.get("kinds")}


async def block_address(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    text = str(params["address"])[:128]
    try:
        addr: Address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return ActionResult(ok=False, detail=f"{text!r} is not an IP address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    security = ctx.security
    timeout_s = parse_duration(params["timeout"]) if "timeout" in params else security.block_timeout_s
    timeout_s = int(min(max(timeout_s, 1.0), 30 * 86400.0))
    set_name = SETS[addr.version]
    data: dict[str, Any] = {"address": str(addr), "table": f"{FAMILY} {TABLE}", "set": set_name,
                            "timeout_s": timeout_s, "evidence": _evidence(str(addr), ctx)}
    why, notes = await asyncio.to_thread(refusal, addr, security, ctx.protected_hosts)
    if notes:
        data["notes"] = notes
    if why:
        return ActionResult(ok=False, detail=f"refused: {why}", data=data)
    argv = [*security.nft, "add", "element", FAMILY, TABLE, set_name,
            "{", str(addr), "timeout", f"{timeout_s}s", "}"]
    data["argv"] = argv
    if ctx.dry_run:
        return ActionResult(ok=True, data=data,
                            detail=f"would block {addr} for {timeout_s}s: " + " ".join(argv))
    env = ctx.env()
    lock = _locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:  # one creator of the table at a time
        ok, what = await asyncio.to_thread(ensure_table, security, env)
        data["table_state"] = what
        if not ok:
            return ActionResult(ok=False, detail=what, data=data)
        before = await asyncio.to_thread(element, security, addr, env)
        if before is None:
            rc, out = await asyncio.to_thread(nft, security, argv[len(security.nft):], env=env)
        else:  # renew: the same element again with a fresh timeout, in one transaction
            script = (f"delete element {FAMILY} {TABLE} {set_name} {{ {addr} }}\n"
                      f"add element {FAMILY} {TABLE} {set_name} {{ {addr} timeout {timeout_s}s }}\n")
            rc, out = await asyncio.to_thread(nft, security, ["-f", "-"], stdin=script, env=env)
        if rc != 0:
            return ActionResult(ok=False, detail=f"nft failed ({rc}): {out.strip()[:300]}", data=data)
        after = await asyncio.to_thread(element, security, addr, env)
    data["element"] = after
    if after is None:
        return ActionResult(ok=False, changed=True, data=data,
                            detail=f"{addr} was added but is not in {FAMILY} {TABLE} {set_name}")
    verb = "renewed the block of" if before is not None else "blocked"
    return ActionResult(ok=True, changed=True, data=data,
                        detail=f"{verb} {addr} for {timeout_s}s ({FAMILY} {TABLE} {set_name}, expires in "
                               f"{after.get('expires')})")

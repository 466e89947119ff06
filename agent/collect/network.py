"""Network collector: per-interface traffic and errors, link state, TCP health, reachability probes.

Sources: ``/proc/net/dev``, ``/sys/class/net/IF/{operstate,carrier,flags}``, ``/proc/net/snmp``
(read with os.open/os.read, :mod:`agent.collect.procfs`), and TCP connects for the configured probes.

Metrics per interface ``IF`` (all but those in ``exclude_interfaces``):

=============================== ================================================================
``net.rx_bytes_per_s[IF]``      received bytes per second
``net.tx_bytes_per_s[IF]``      transmitted bytes per second
``net.rx_packets_per_s[IF]``    received packets per second
``net.tx_packets_per_s[IF]``    transmitted packets per second
``net.rx_errors_per_s[IF]``     receive errors per second
``net.tx_errors_per_s[IF]``     transmit errors per second
``net.rx_drops_per_s[IF]``      receive drops per second
``net.tx_drops_per_s[IF]``      transmit drops per second
``net.link_up[IF]``             1 when the link is up, 0 when down (operstate; for ``unknown``,
                                as on ``lo``, the carrier or the IFF_UP flag decides)
=============================== ================================================================

TCP (``/proc/net/snmp``):

=============================== ================================================================
``net.tcp_retrans_segs``        RetransSegs since boot, segments
``net.tcp_retrans_per_s``       retransmitted segments per second
``net.tcp_out_rsts_per_s``      resets sent per second (OutRsts)
``net.tcp_attempt_fails_per_s`` failed connection attempts per second (AttemptFails)
``net.tcp_curr_estab``          established connections now (CurrEstab)
=============================== ================================================================

Probes (``probes``; each a TCP connect to host:port within its own ``timeout_s``, all run together
every ``probe_interval_s`` by a background thread so that a slow probe never delays a pass):

=============================== ================================================================
``net.probe_ok[NAME]``          1 when the last connect succeeded, 0 when it failed
``net.probe_ms[NAME]``          how long the last successful connect took, ms (None on failure)
=============================== ================================================================

Before a probe's first result both are None. Name resolution (``getaddrinfo``) is not covered
by the probe timeout; give probes addresses where that matters.

Events: ``net.link_down`` (label ``interface``) when an interface whose link was up goes down.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agent.collect.base import BaseCollector
from agent.collect.counters import RateTracker
from agent.collect.procfs import read_text
from agent.collect.sample import Event, Metrics, Reading, key
from agent.collect.settings import NetworkSettings, Probe

# /proc/net/dev columns after "IF:": rx bytes packets errs drop fifo frame compressed multicast,
# tx bytes packets errs drop fifo colls carrier compressed.
_DEV_FIELDS = (
    ("rx_bytes", 0),
    ("rx_packets", 1),
    ("rx_errors", 2),
    ("rx_drops", 3),
    ("tx_bytes", 8),
    ("tx_packets", 9),
    ("tx_errors", 10),
    ("tx_drops", 11),
)
_IFF_UP = 0x1
_TCP_RATES = (
    ("RetransSegs", "net.tcp_retrans_per_s"),
    ("OutRsts", "net.tcp_out_rsts_per_s"),
    ("AttemptFails", "net.tcp_attempt_fails_per_s"),
)

class _IfKeys:
    """The metric and rate keys of one interface, built once instead of per pass."""

    __slots__ = ("fields", "link", "sys")

    def __init__(self, ifname: str, sys_dir: str) -> None:
        self.fields = tuple((col, key(f"net.{f}_per_s", ifname), f"{f}/{ifname}") for f, col in _DEV_FIELDS)
        self.link = key("net.link_up", ifname)
        self.sys = f"{sys_dir}/{ifname}"


def parse_net_dev(text: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        try:
            out[name.strip()] = [int(v) for v in rest.split()]
        except ValueError:
            continue
    return out


def parse_snmp(text: str, proto: str = "Tcp") -> dict[str, int]:
    """The ``proto:`` header/value line pair of /proc/net/snmp as a dict."""
    lines = [ln.split() for ln in text.splitlines() if ln.startswith(f"{proto}:")]
    if len(lines) < 2:
        return {}
    out: dict[str, int] = {}
    for name, val in zip(lines[0][1:], lines[1][1:], strict=False):
        try:
            out[name] = int(val)
        except ValueError:
            continue
    return out


def tcp_probe(probe: Probe) -> float | None:
    """Connect to ``probe``; milliseconds taken, or None when it failed or timed out."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((probe.host, probe.port), timeout=probe.timeout_s):
            return (time.monotonic() - t0) * 1000.0
    except OSError:  # refused, unreachable, timeout (socket.timeout is an OSError), DNS failure
        return None


class _Prober:
    """Runs every probe each ``interval_s`` in a daemon thread; keeps the last result of each."""

    def __init__(self, probes: tuple[Probe, ...], interval_s: float) -> None:
        self.probes = probes
        self.interval_s = interval_s
        self.results: dict[str, tuple[bool, float | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(probes)), thread_name_prefix="heald-probe")
        self._thread = threading.Thread(target=self._run, name="heald-net-probes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max((p.timeout_s for p in self.probes), default=1.0) + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, tuple[bool, float | None]]:
        with self._lock:
            return dict(self.results)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                got = list(self._pool.map(tcp_probe, self.probes))
            except RuntimeError:  # pool shut down while stopping
                return
            with self._lock:
                for probe, ms in zip(self.probes, got, strict=True):
                    self.results[probe.name] = (ms is not None, ms)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))


class NetworkCollector(BaseCollector[NetworkSettings]):
    """See the module docstring for the metrics and events."""

    name = "network"
    inline = True  # /proc and /sys reads only (the probes run in their own thread): on the event loop

    def __init__(self, settings: NetworkSettings | None = None, *, root: str = "/") -> None:
        super().__init__(settings or NetworkSettings(), root=root)
        self._rates = RateTracker()
        self._link: dict[str, bool] = {}
        self._exclude = frozenset(self.settings.exclude_interfaces)
        self._prober: _Prober | None = None
        self._if_keys: dict[str, _IfKeys] = {}
        # (name, net.probe_ok key, net.probe_ms key) of each configured probe, built once.
        self._probe_keys = tuple(
            (p.name, key("net.probe_ok", p.name), key("net.probe_ms", p.name)) for p in self.settings.probes
        )

    def start(self) -> None:
        self._require("proc/net/dev")
        if self.settings.probes and self._prober is None:
            self._prober = _Prober(self.settings.probes, self.settings.probe_interval_s)
            self._prober.start()

    def close(self) -> None:
        if self._prober is not None:
            self._prober.stop()
            self._prober = None

    def collect(self) -> Reading:
        now = time.monotonic()
        m: Metrics = {}
        events: list[Event] = []
        self._interfaces(m, events, now)
        self._tcp(m, now)
        self._probes(m)
        self._rates.sweep()
        return Reading(metrics=m, events=events)

    def _interfaces(self, m: Metrics, events: list[Event], now: float) -> None:
        text = read_text(self._p("proc/net/dev"))
        if text is None:
            return
        devs = parse_net_dev(text)
        rate = self._rates.rate
        if_keys = self._if_keys
        for ifname, vals in devs.items():
            if ifname in self._exclude:
                continue
            k = if_keys.get(ifname)
            if k is None:
                k = if_keys[ifname] = _IfKeys(ifname, self._p("sys/class/net"))
            n = len(vals)
            for col, metric_key, rate_key in k.fields:
                m[metric_key] = rate(rate_key, vals[col] if col < n else None, now)
            up = self._link_up(k.sys)
            m[k.link] = None if up is None else float(up)
            was = self._link.get(ifname)
            if up is not None:
                self._link[ifname] = up
            if was and up is False:
                events.append(
                    self._event("net.link_down", f"link of {ifname} went down",
                                value=0.0, labels={"interface": ifname})
                )
        for gone in [i for i in self._link if i not in devs]:
            del self._link[gone]
        if len(if_keys) > len(devs):
            for gone in [i for i in if_keys if i not in devs]:
                del if_keys[gone]

    @staticmethod
    def _link_up(base: str) -> bool | None:
        """From /sys/class/net/IF (``base``): operstate, else carrier, else the IFF_UP flag."""
        state = read_text(f"{base}/operstate")
        if state is None:
            return None
        state = state.strip()
        if state == "up":
            return True
        if state != "unknown":  # down, lowerlayerdown, dormant, notpresent, testing
            return False
        carrier = read_text(f"{base}/carrier")  # reading fails with EINVAL when admin-down
        if carrier is not None and carrier.strip() in ("0", "1"):
            return carrier.strip() == "1"
        flags = read_text(f"{base}/flags")
        try:
            return flags is not None and bool(int(flags.strip(), 16) & _IFF_UP)
        except ValueError:
            return None

    def _tcp(self, m: Metrics, now: float) -> None:
        text = read_text(self._p("proc/net/snmp"))
        tcp = parse_snmp(text) if text is not None else {}
        if not tcp and text is not None:
            return  # no TCP section: no TCP metrics
        retrans = tcp.get("RetransSegs")
        m["net.tcp_retrans_segs"] = None if retrans is None else float(retrans)
        for field, metric in _TCP_RATES:
            m[metric] = self._rates.rate(f"tcp/{field}", tcp.get(field), now)
        estab = tcp.get("CurrEstab")
        m["net.tcp_curr_estab"] = None if estab is None else float(estab)

    def _probes(self, m: Metrics) -> None:
        if not self.settings.probes:
            return
        results = self._prober.snapshot() if self._prober is not None else {}
        for name, ok_key, ms_key in self._probe_keys:
            ok, ms = results.get(name, (None, None))
            m[ok_key] = None if ok is None else float(ok)
            m[ms_key] = ms

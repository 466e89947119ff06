"""Network collector: loopback traffic, link transitions, TCP counters, reachability probes."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent.collect.network import NetworkCollector, parse_snmp
from agent.collect.settings import NetworkSettings, Probe

MB = 1024 * 1024


def _push_through_loopback(nbytes: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        received = 0

        def sink() -> None:
            nonlocal received
            conn, _ = srv.accept()
            with conn:
                while chunk := conn.recv(65536):
                    received += len(chunk)

        t = threading.Thread(target=sink)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as cli:
            cli.sendall(b"x" * nbytes)
        t.join(timeout=10)
        assert received == nbytes


def test_loopback_rx_moves_after_1mb() -> None:
    c = NetworkCollector(NetworkSettings())
    c.start()
    c.collect()
    time.sleep(0.05)
    _push_through_loopback(MB)
    time.sleep(0.05)
    m = c.collect().metrics
    rx = m["net.rx_bytes_per_s[lo]"]
    assert rx is not None
    # at least 1 MB arrived within the interval (well under 10 s)
    assert rx > MB / 10
    assert m["net.link_up[lo]"] == 1.0
    assert m["net.tcp_retrans_segs"] is not None
    assert "net.tcp_retrans_per_s" in m
    c.close()


def test_exclude_interfaces() -> None:
    c = NetworkCollector(NetworkSettings(exclude_interfaces=("lo",)))
    c.start()
    assert not any(k.endswith("[lo]") for k in c.collect().metrics)


NET_DEV = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast"
    "|bytes    packets errs drop fifo colls carrier compressed\n"
    "  eth9: {rx} 10 {err} 0 0 0 0 0 {tx} 20 0 0 0 0 0 0\n"
)
SNMP = (
    "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets"
    " CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n"
    "Tcp: 1 200 120000 -1 77 50 {fails} 5 2 2228 1527 {retrans} 0 {rsts} 0\n"
)


def test_fixture_rates_link_down_event_and_counter_reset(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    sysdir = tmp_path / "sys/class/net/eth9"
    sysdir.mkdir(parents=True)
    (sysdir / "operstate").write_text("up\n")
    (tmp_path / "proc/net/dev").write_text(NET_DEV.format(rx=1000, tx=500, err=0))
    (tmp_path / "proc/net/snmp").write_text(SNMP.format(fails=1, retrans=10, rsts=3))
    c = NetworkCollector(root=str(tmp_path))
    c.start()
    r = c.collect()
    assert r.metrics["net.link_up[eth9]"] == 1.0
    assert r.metrics["net.rx_bytes_per_s[eth9]"] is None
    assert r.metrics["net.tcp_retrans_segs"] == 10
    time.sleep(0.2)
    (tmp_path / "proc/net/dev").write_text(NET_DEV.format(rx=3000, tx=500, err=4))
    (tmp_path / "proc/net/snmp").write_text(SNMP.format(fails=3, retrans=30, rsts=3))
    (sysdir / "operstate").write_text("down\n")
    r = c.collect()
    rx, errs = r.metrics["net.rx_bytes_per_s[eth9]"], r.metrics["net.rx_errors_per_s[eth9]"]
    assert rx is not None
    assert errs is not None
    assert rx == pytest.approx(2000 / 0.2, rel=0.5)
    assert errs > 0
    assert r.metrics["net.tx_bytes_per_s[eth9]"] == 0.0
    retrans = r.metrics["net.tcp_retrans_per_s"]
    assert retrans is not None
    assert retrans > 0
    assert r.metrics["net.link_up[eth9]"] == 0.0
    assert [(e.kind, e.labels) for e in r.events] == [("net.link_down", {"interface": "eth9"})]
    # the interface is re-created: its counters restart from 0 -> None, never a negative rate
    (tmp_path / "proc/net/dev").write_text(NET_DEV.format(rx=10, tx=5, err=0))
    r = c.collect()
    assert r.metrics["net.rx_bytes_per_s[eth9]"] is None
    assert not r.events  # still down: no second event


def test_unknown_operstate_falls_back_to_carrier(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/dev").write_text(NET_DEV.format(rx=1, tx=1, err=0))
    sysdir = tmp_path / "sys/class/net/eth9"
    sysdir.mkdir(parents=True)
    (sysdir / "operstate").write_text("unknown\n")
    (sysdir / "flags").write_text("0x1002\n")  # IFF_UP clear
    c = NetworkCollector(root=str(tmp_path))
    c.start()
    assert c.collect().metrics["net.link_up[eth9]"] == 0.0
    (sysdir / "carrier").write_text("1\n")
    m = c.collect().metrics
    assert m["net.link_up[eth9]"] == 1.0
    assert "net.tcp_retrans_segs" not in m or m["net.tcp_retrans_segs"] is None


def test_parse_snmp() -> None:
    tcp = parse_snmp(SNMP.format(fails=1, retrans=2, rsts=3))
    assert (tcp["AttemptFails"], tcp["RetransSegs"], tcp["OutRsts"]) == (1, 2, 3)
    assert parse_snmp("Ip: a b\nIp: 1 2\n") == {}


def test_probes_ok_and_failing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        open_port = srv.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]  # bound, not listening: connect is refused
            settings = NetworkSettings(
                probes=(
                    Probe(name="up", host="127.0.0.1", port=open_port, timeout_s=1.0),
                    Probe(name="down", host="127.0.0.1", port=closed_port, timeout_s=0.5),
                ),
                probe_interval_s=0.1,
            )
            c = NetworkCollector(settings)
            c.start()
            try:
                deadline = time.monotonic() + 5
                m = c.collect().metrics
                while m["net.probe_ok[up]"] is None or m["net.probe_ok[down]"] is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                    m = c.collect().metrics
            finally:
                c.close()
    assert m["net.probe_ok[up]"] == 1.0
    ms = m["net.probe_ms[up]"]
    assert ms is not None
    assert 0 <= ms < 1000
    assert m["net.probe_ok[down]"] == 0.0
    assert m["net.probe_ms[down]"] is None


def test_vanished_interface_is_absent_and_forgotten(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    for ifname in ("eth9", "eth8"):
        (tmp_path / f"sys/class/net/{ifname}").mkdir(parents=True)
        (tmp_path / f"sys/class/net/{ifname}/operstate").write_text("up\n")
    two = NET_DEV.format(rx=1, tx=1, err=0) + NET_DEV.format(rx=1, tx=1, err=0).splitlines()[-1].replace(
        "eth9", "eth8") + "\n"
    (tmp_path / "proc/net/dev").write_text(two)
    c = NetworkCollector(root=str(tmp_path))
    c.start()
    m = c.collect().metrics
    assert m["net.link_up[eth8]"] == 1.0
    assert m["net.link_up[eth9]"] == 1.0
    (tmp_path / "proc/net/dev").write_text(NET_DEV.format(rx=2, tx=2, err=0))
    m = c.collect().metrics
    assert "net.link_up[eth8]" not in m
    assert "net.rx_bytes_per_s[eth8]" not in m
    assert m["net.rx_bytes_per_s[eth9]"] is not None

"""agent/collect/sockdiag.py: the established TCP sockets and the listeners read from netlink
sock_diag, in-process.

Against the real kernel: real connections over loopback (IPv4, IPv6, a v4-mapped IPv6 socket)
and to this host's own non-loopback address, their inodes and the bytes the peer acknowledged,
and the same socket set as ``ss -tinHe state established`` where ss exists. The parser: kernel
answers built byte for byte, and any bytes at all (truncated, lying lengths) parse without an
exception other than the OSError of an error answer. The listeners: our own TCP and UDP sockets
(IPv4, IPv6, a connected UDP socket that is not one) as ``/proc/net`` lists them, and a
collector that falls back to ``/proc/net`` when sock_diag is refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect import sockdiag
from agent.collect.security_net import SecurityNetCollector, parse_proc_net
from agent.collect.security_proc import parse_ss
from agent.collect.settings import SecurityNetSettings


@contextmanager
def _pair(family: int, host: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server side) TCP pair to ``host``."""
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        try:
            client.connect(server.getsockname()[:2])
            conn, _ = server.accept()
            with conn:
                yield client, conn
        finally:
            client.close()


def _inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def _acked(client: socket.socket, conn: socket.socket, payload: bytes) -> dict[int, tuple[bool, int]]:
    """Send ``payload``, let the peer read it all, and read the sockets until the kernel says acked."""
    client.sendall(payload)
    got = 0
    while got < len(payload):
        got += len(conn.recv(1 << 20))
    deadline = time.monotonic() + 5
    while True:
        socks = sockdiag.established()
        if socks.get(_inode(client), (False, 0))[1] >= len(payload) or time.monotonic() > deadline:
            return socks


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_loopback_connection_is_seen_with_its_acknowledged_bytes(family: int, host: str) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with _pair(family, host) as (client, conn):
        socks = _acked(client, conn, b"x" * 300_000)
        assert socks[_inode(client)] == (True, pytest.approx(300_000, abs=1))
        assert socks[_inode(conn)][0] is True  # the server side: a loopback peer too
        assert socks[_inode(conn)][1] <= 1  # it sent nothing (the SYN-ACK's sequence number at most)


def test_a_kernel_refusing_the_one_walk_request_is_read_a_family_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses the older TCPDIAG_GETSOCK request (here: a request it has no
    handler for, answered with an error), the sockets of both families are read with one
    SOCK_DIAG_BY_FAMILY dump each: the same sockets."""
    flags = sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP
    refused = struct.pack("=IHHII", 16 + 60, 99, flags, 1, 0) + bytes(60)
    families: list[int] = []
    real = sockdiag.request

    def request(family: int, seq: int = 1) -> bytes:
        families.append(family)
        return real(family, seq)

    with _pair(socket.AF_INET, "127.0.0.1") as (v4, _c4), _pair(socket.AF_INET6, "::1") as (v6, _c6):
        both = sockdiag.established()
        assert families == []  # one request answered both families
        monkeypatch.setattr(sockdiag, "request_both", lambda: refused)
        monkeypatch.setattr(sockdiag, "request", request)
        apart = sockdiag.established()
        inodes = [_inode(v4), _inode(v6)]
    assert families == [socket.AF_INET, socket.AF_INET6]
    for inode in inodes:
        assert both[inode] == apart[inode]
        assert both[inode][0] is True  # a loopback peer


def test_a_v4_mapped_ipv6_socket_to_127_is_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
            client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            client.connect(("::ffff:127.0.0.1", server.getsockname()[1]))
            conn, _ = server.accept()
            with conn:
                assert sockdiag.established()[_inode(client)][0] is True


def _own_address() -> str | None:
    """This host's first non-loopback IPv4 address (a route's source address), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route looked up
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_a_connection_to_a_non_loopback_address_is_egress() -> None:
    address = _own_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    with _pair(socket.AF_INET, address) as (client, conn):
        socks = _acked(client, conn, b"y" * 50_000)
        assert socks[_inode(client)] == (False, pytest.approx(50_000, abs=1))


def test_the_same_sockets_as_ss() -> None:
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("no ss here")
    with _pair(socket.AF_INET, "127.0.0.1") as (client, _conn):
        inode = _inode(client)
        for _ in range(5):  # other processes' sockets come and go between the three reads
            ours = sockdiag.established()
            theirs = parse_ss(subprocess.run([ss, "-tinHe", "state", "established"], capture_output=True,
                                             text=True, check=True).stdout)
            ours_again = sockdiag.established()
            assert ours[inode] == theirs[inode] == ours_again[inode]  # loopback, nothing sent
            # what ss saw, one of our reads saw; what both of ours saw, ss saw
            if set(theirs) <= set(ours) | set(ours_again) and set(ours) & set(ours_again) <= set(theirs):
                break
        else:
            pytest.fail(f"ss {sorted(theirs)} vs ours {sorted(ours)} and {sorted(ours_again)}")
    for common in set(theirs) & set(ours):
        assert theirs[common][0] == ours[common][0]


# ---------------------------------------------------------------------------- listeners


def _proc_net(protocols: tuple[str, ...]) -> set[tuple[str, str, int, int]]:
    out = set()
    for proto in protocols:
        for fam in ("", "6"):
            with open(f"/proc/net/{proto}{fam}", encoding="ascii") as f:
                out |= {(proto, a, p, i) for a, p, i in parse_proc_net(f, proto)}
    return out


def test_the_listeners_are_those_proc_net_lists_tcp_and_udp_both_families() -> None:
    with socket.create_server(("127.0.0.1", 0)) as t4, \
            socket.create_server(("::1", 0), family=socket.AF_INET6) as t6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u4, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unbound:
        u4.bind(("127.0.0.1", 0))
        u6.bind(("::1", 0))
        client.connect(u4.getsockname())  # connected: a client's, not a listener
        ours = {("tcp", "127.0.0.1", t4.getsockname()[1], _inode(t4)),
                ("tcp", "::1", t6.getsockname()[1], _inode(t6)),
                ("udp", "127.0.0.1", u4.getsockname()[1], _inode(u4)),
                ("udp", "::1", u6.getsockname()[1], _inode(u6))}
        for _ in range(5):  # the host is shared: other listeners may come and go between reads
            got = sockdiag.listening(("tcp", "udp"))
            if set(got) == _proc_net(("tcp", "udp")):
                break
        else:
            pytest.fail(f"sock_diag {sorted(got)} vs /proc/net {sorted(_proc_net(('tcp', 'udp')))}")
        assert ours <= set(got)
        assert len(got) == len(set(got))
        inodes = {i for *_, i in got}
        assert _inode(client) not in inodes
        assert _inode(unbound) not in inodes
        assert {p for p, *_ in sockdiag.listening()} <= {"tcp"}  # the default: TCP only


def test_a_collector_refused_sock_diag_reads_listeners_from_proc_net(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refused(*_a: object, **_k: object) -> list[tuple[str, str, int, int]]:
        calls.append(1)
        raise PermissionError(1, "Operation not permitted")  # as a seccomp filter answers

    monkeypatch.setattr(sockdiag, "listening", refused)
    c = SecurityNetCollector(SecurityNetSettings(auth_source="files", auth_files=(), listener_interval_s=0.0,
                                                 baseline_s=0.0, listener_ignore_loopback=False))
    c.start()
    try:
        c.collect()  # the baseline, read from /proc/net after the refusal
        with socket.create_server(("127.0.0.1", 0)) as new:
            port = str(new.getsockname()[1])
            events = [e for e in c.collect().events if e.kind == "sec.new_listener"]
            assert port in {e.labels["port"] for e in events}
        assert calls == [1]  # refused once: not asked again
    finally:
        c.close()


# ---------------------------------------------------------------------------- the parser

_HDR = struct.Struct("=IHHII")


def _message(inode: int, dst: bytes, family: int, acked: int | None, *, info_len: int = 232) -> bytes:
    body = sockdiag._MSG.pack(family, 1, 0, 0, b"\0\1", b"\0\2", bytes(16), dst.ljust(16, b"\0"), 0,
                              bytes(8), 0, 0, 0, 0, inode)
    if acked is not None:
        info = bytearray(info_len)
        if info_len >= 128:
            struct.pack_into("=Q", info, 120, acked)
        attr = struct.pack("=HH", 4 + info_len, sockdiag.INET_DIAG_INFO) + bytes(info)
        body += attr + bytes(-len(attr) % 4)
    return _HDR.pack(_HDR.size + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


_DONE = _HDR.pack(_HDR.size + 4, sockdiag.NLMSG_DONE, 2, 1, 0) + bytes(4)


def test_the_parser_reads_each_socket_and_stops_at_done() -> None:
    data = (_message(11, bytes([127, 0, 0, 1]), socket.AF_INET, 5)
            + _message(12, bytes([10, 0, 0, 7]), socket.AF_INET, 2**40)
            + _message(13, socket.inet_pton(socket.AF_INET6, "::1"), socket.AF_INET6, 0)
            + _message(14, socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.9"), socket.AF_INET6, 7)
            + _message(15, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.AF_INET6, None)
            + _message(16, bytes([10, 0, 0, 8]), socket.AF_INET, 9, info_len=120))  # too old: no field
    out: dict[int, tuple[bool, int]] = {}
    assert sockdiag.parse_dump(data, out) is False  # more to come
    assert out == {11: (True, 5), 12: (False, 2**40), 13: (True, 0), 14: (True, 7), 15: (False, 0),
                   16: (False, 0)}
    assert sockdiag.parse_dump(_DONE, out) is True


def test_an_error_answer_is_an_oserror() -> None:
    error = _HDR.pack(_HDR.size + 4, sockdiag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -22)
    with pytest.raises(OSError, match="Invalid argument"):
        sockdiag.parse_dump(error, {})


def test_a_message_longer_than_the_read_ends_the_dump() -> None:
    whole = _message(21, bytes([127, 0, 0, 1]), socket.AF_INET, 1)
    out: dict[int, tuple[bool, int]] = {}
    assert sockdiag.parse_dump(whole + whole[:-8], out) is True
    assert out == {21: (True, 1)}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_without_an_exception_but_an_error_answers(data: bytes) -> None:
    out: dict[int, tuple[bool, int]] = {}
    try:
        done = sockdiag.parse_dump(data, out)
    except OSError:
        return  # an NLMSG_ERROR with an errno: the kernel's no
    assert isinstance(done, bool)
    assert all(isinstance(k, int) and k > 0 for k in out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.binary(min_size=4, max_size=4),
                          st.integers(0, 2**64 - 1)), max_size=20, unique_by=lambda t: t[0]),
       st.integers(0, 200))
def test_built_answers_round_trip_and_any_cut_keeps_a_prefix(
        socks: list[tuple[int, bytes, int]], cut: int) -> None:
    data = b"".join(_message(i, d, socket.AF_INET, a) for i, d, a in socks)
    out: dict[int, tuple[bool, int]] = {}
    sockdiag.parse_dump(data, out)
    assert out == {i: (d[0] == 127, a) for i, d, a in socks}
    cut_out: dict[int, tuple[bool, int]] = {}
    sockdiag.parse_dump(data[: max(0, len(data) - cut)], cut_out)
    assert all(out[k] == v for k, v in cut_out.items())


def _listener(inode: int, family: int, src: bytes, sport: int, dport: int = 0) -> bytes:
    body = sockdiag._MSG.pack(family, 10, 0, 0, sport.to_bytes(2, "big"), dport.to_bytes(2, "big"),
                              src.ljust(16, b"\0"), bytes(16), 0, bytes(8), 0, 0, 0, 0, inode)
    return _HDR.pack(_HDR.size + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_the_listener_parser_reads_address_port_and_inode() -> None:
    data = (_listener(31, socket.AF_INET, bytes([0, 0, 0, 0]), 22)
            + _listener(32, socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1"), 8080)
            + _listener(33, socket.AF_INET, bytes([127, 0, 0, 1]), 53, dport=4242)  # a peer
            + _listener(34, 99, bytes(16), 1))  # not an inet family
    out: list[tuple[str, int, int]] = []
    assert sockdiag.parse_listening(data, out) is False
    assert out == [("0.0.0.0", 22, 31), ("::1", 8080, 32), ("127.0.0.1", 53, 33)]
    udp: list[tuple[str, int, int]] = []
    assert sockdiag.parse_listening(data + _DONE, udp, udp=True) is True
    assert udp == [("0.0.0.0", 22, 31), ("::1", 8080, 32)]  # a UDP socket with a peer is a client


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_any_bytes_parse_as_listeners_without_an_exception_but_an_error_answers(
        data: bytes, udp: bool) -> None:
    out: list[tuple[str, int, int]] = []
    try:
        done = sockdiag.parse_listening(data, out, udp=udp)
    except OSError:
        return
    assert isinstance(done, bool)
    assert all(0 <= port < 65536 for _, port, _ in out)

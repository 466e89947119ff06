"""Established TCP sockets from the kernel's sock_diag netlink interface, in-process.

What ``ss -tinHe state established`` prints, without starting ``ss``: one dump request asking
for ``INET_DIAG_INFO``, answered with one ``inet_diag_msg`` per socket (its inode, its peer
address) and the socket's ``struct tcp_info``, whose ``tcpi_bytes_acked`` (Linux >= 4.1) is the
figure ``ss`` prints as ``bytes_acked``. The request is the older ``TCPDIAG_GETSOCK`` one
(``struct inet_diag_req``), which the kernel answers for both address families in one walk of its
established-socket hash (IPv4 and IPv6 sockets share it: about 0.9 ms a walk with 262,144
buckets); ``ss`` and the ``SOCK_DIAG_BY_FAMILY`` request walk it once per family. Where the older
request is refused, one ``SOCK_DIAG_BY_FAMILY`` dump a family is made instead. On a 2-CPU VM an
egress pass cost 7.3 ms of CPU with ``ss`` (process and child), 4.1 ms with a dump a family; the
dumps alone 1.8 ms a family each and 0.9 ms both at once.

:func:`established` returns ``{inode: (peer is loopback, bytes_acked)}`` like
:func:`agent.collect.security_proc.parse_ss`, or raises :class:`OSError` where netlink sock_diag
is not there (then the caller goes on with ``ss``). :func:`parse_dump` is the pure parser of the
kernel's answer: every length in it is checked, and a truncated or odd message ends the parse
with what was read so far.

:func:`listening` returns the listening TCP sockets (and the bound, unconnected UDP ones) with
their local address, port and inode, what ``/proc/net/{tcp,tcp6,udp,udp6}`` lists
(:func:`agent.collect.security_net.parse_proc_net`). A dump that asks for listeners only walks
the kernel's listening hash and stops there, where reading ``/proc/net/tcp`` walks the whole
established-socket hash too, however few sockets it lists: on a 2-CPU VM with 24 GiB (262,144
buckets) 0.14 ms for both TCP families against 8.8 ms (``python3 bench/collector_cost.py``
measures the collector). :func:`parse_listening` is its parser, checked like :func:`parse_dump`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Final

__all__ = ["established", "listening", "parse_dump", "parse_listening", "request", "request_both"]

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
TCPDIAG_GETSOCK: Final = 18  # the older request: both address families in one walk (inet_diag_req)
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_DUMP: Final = 0x300
INET_DIAG_INFO: Final = 2
TCP_ESTABLISHED: Final = 1
TCP_CLOSE: Final = 7  # a UDP socket that is bound but not connected
TCP_LISTEN: Final = 10

_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
#: inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (all zero: every socket)
_REQ: Final = struct.Struct("=BBBxI48x")
#: inet_diag_req: family (AF_UNSPEC: both), src_len, dst_len, ext; inet_diag_sockid; states, dbs
_REQ_BOTH: Final = struct.Struct("=BBBB48xII")
#: inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian), src[16],
#: dst[16], if, cookie[2]; expires, rqueue, wqueue, uid, inode
_MSG: Final = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_RTA: Final = struct.Struct("=HH")
_ERRNO: Final = struct.Struct("=i")
_BYTES_ACKED: Final = struct.Struct("=Q")
_BYTES_ACKED_AT: Final = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"


def request(family: int, seq: int = 1, *, protocol: int = socket.IPPROTO_TCP,
            states: int = 1 << TCP_ESTABLISHED, ext: int = 1 << (INET_DIAG_INFO - 1)) -> bytes:
    """A dump request: by default the established TCP sockets of ``family`` with their tcp_info."""
    body = _REQ.pack(family, protocol, ext, states)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


def request_both(seq: int = 1, *, states: int = 1 << TCP_ESTABLISHED,
                 ext: int = 1 << (INET_DIAG_INFO - 1)) -> bytes:
    """A ``TCPDIAG_GETSOCK`` dump request: the TCP sockets in ``states`` of both address families,
    with their tcp_info, answered in one walk of the kernel's hash."""
    body = _REQ_BOTH.pack(socket.AF_UNSPEC, 0, 0, ext, states, 0)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), TCPDIAG_GETSOCK, flags, seq, 0) + body


def _align(n: int) -> int:
    return (n + 3) & ~3


def _is_loopback(family: int, dst: bytes) -> bool:
    if family == socket.AF_INET:
        return dst[0] == 127
    if dst.startswith(_V4_MAPPED):
        return dst[12] == 127
    return ipaddress.IPv6Address(dst).is_loopback


_ANSWERS: Final = frozenset({SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK})  # a socket's message: the request's type


def _messages(data: bytes) -> tuple[list[tuple[int, int]], bool]:
    """The socket messages of one ``recv`` of a dump as ``(body offset, end offset)``, and whether
    the dump is over (its ``NLMSG_DONE``, or a message that does not parse). An error the kernel
    answered with is raised as :class:`OSError`."""
    found: list[tuple[int, int]] = []
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > len(data):
            return found, True
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:  # the request refused (an errno), or an acknowledgement (0)
            (error,) = _ERRNO.unpack_from(data, at + _NLMSGHDR.size) if length >= _NLMSGHDR.size + 4 else (0,)
            if error:
                raise OSError(-error, os.strerror(-error))
            return found, True
        if kind in _ANSWERS and length - _NLMSGHDR.size >= _MSG.size:
            found.append((at + _NLMSGHDR.size, at + length))
        at += _align(length)
    return found, False


def parse_dump(data: bytes, out: dict[int, tuple[bool, int]]) -> bool:
    """Add the sockets of one ``recv`` of a dump to ``out``; True once the dump is over (its
    ``NLMSG_DONE``, or a message that does not parse). An error the kernel answered with is
    raised as :class:`OSError`."""
    found, done = _messages(data)
    for body, end in found:
        family, _state, _t, _r, _sp, _dp, _src, dst, _if, _ck, _ex, _rq, _wq, _uid, inode = \
            _MSG.unpack_from(data, body)
        acked = 0
        rta = body + _MSG.size
        while rta + _RTA.size <= end:
            rta_len, rta_type = _RTA.unpack_from(data, rta)
            if rta_len < _RTA.size or rta + rta_len > end:
                break
            if rta_type == INET_DIAG_INFO and rta_len - _RTA.size >= _BYTES_ACKED_AT + _BYTES_ACKED.size:
                (acked,) = _BYTES_ACKED.unpack_from(data, rta + _RTA.size + _BYTES_ACKED_AT)
            rta += _align(rta_len)
        if inode:
            out[inode] = (_is_loopback(family, dst), acked)
    return done


def _address(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(raw))


def parse_listening(data: bytes, out: list[tuple[str, int, int]], *, udp: bool = False) -> bool:
    """Add the sockets of one ``recv`` of a listener dump to ``out`` as ``(address, port,
    inode)``; with ``udp``, only those with no peer (a connected UDP socket is a client's). True
    once the dump is over; an error answer is raised as :class:`OSError` (as :func:`parse_dump`)."""
    found, done = _messages(data)
    for body, _end in found:
        family, _state, _t, _r, sport, dport, src, _dst, _if, _ck, _ex, _rq, _wq, _uid, inode = \
            _MSG.unpack_from(data, body)
        if family in (socket.AF_INET, socket.AF_INET6) and not (udp and dport != b"\0\0"):
            out.append((_address(family, src), int.from_bytes(sport, "big"), inode))
    return done


def _dump(sock: socket.socket, req: bytes, parse: Callable[[bytes], bool]) -> None:
    sock.send(req)
    while not parse(sock.recv(65536)):
        pass


def listening(protocols: Iterable[str] = ("tcp",), timeout_s: float = 1.0) -> list[tuple[str, str, int, int]]:
    """The listening sockets of ``protocols`` (``"tcp"``: TCP in LISTEN; ``"udp"``: UDP bound
    and not connected), both address families: ``(protocol, address, port, inode)``, the same
    as the ``/proc/net`` tables list. Raises OSError (TimeoutError) as :func:`established`."""
    out: list[tuple[str, str, int, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(timeout_s)
        sock.bind((0, 0))
        seq = 0
        for proto in protocols:
            udp = proto == "udp"
            number, state = (socket.IPPROTO_UDP, TCP_CLOSE) if udp else (socket.IPPROTO_TCP, TCP_LISTEN)
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                found: list[tuple[str, int, int]] = []
                _dump(sock, request(family, seq, protocol=number, states=1 << state, ext=0),
                      functools.partial(parse_listening, out=found, udp=udp))
                out.extend((proto, addr, port, inode) for addr, port, inode in found)
    return out


def established(timeout_s: float = 1.0) -> dict[int, tuple[bool, int]]:
    """The established TCP sockets (IPv4 and IPv6): ``{inode: (peer is loopback, bytes_acked)}``.
    Raises OSError where netlink sock_diag cannot be used (not Linux, a kernel without it, a
    seccomp filter), and TimeoutError when the kernel does not answer within ``timeout_s``."""
    try:
        return _established([request_both()], timeout_s)
    except TimeoutError:
        raise
    except OSError:  # a kernel that refuses the older request: one dump a family, on a new socket
        return _established([request(socket.AF_INET, 1), request(socket.AF_INET6, 2)], timeout_s)


def _established(requests: list[bytes], timeout_s: float) -> dict[int, tuple[bool, int]]:
    out: dict[int, tuple[bool, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(timeout_s)
        sock.bind((0, 0))
        for req in requests:
            _dump(sock, req, functools.partial(parse_dump, out=out))
    return out

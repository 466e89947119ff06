"""Small fault workers, run as child processes by ``bench/faults/run.py`` (argv only, no shell).

    python3 workers.py grow CGROUP_PROCS RATE_MB_S        # join a cgroup, grow RSS until killed
    python3 workers.py fill PATH RATE_MB_S                # write until ENOSPC, then hold
    python3 workers.py inodes DIR RATE_PER_S              # create empty files until ENOSPC, then hold
    python3 workers.py sink HOST PORT                     # TCP sink (run inside the fault netns)
    python3 workers.py source HOST PORT RATE_KB_S         # steady TCP sender with small requests
    python3 workers.py spin SECONDS                       # CPU busy loop (stress-ng fallback)

``fill``/``inodes`` print ``ENOSPC <wall>`` on stdout when the filesystem refuses the write.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time


def grow(procs: str, rate_mb: float) -> None:
    with open(procs, "w", encoding="ascii") as f:
        f.write(str(os.getpid()))
    chunks: list[bytes] = []
    step = 0.1
    per = int(rate_mb * 1024 * 1024 * step)
    nxt = time.monotonic()
    while True:
        chunks.append(b"\xa5" * per)  # memset: the pages are really touched
        nxt += step
        time.sleep(max(0.0, nxt - time.monotonic()))


def fill(path: str, rate_mb: float) -> None:
    step = 0.1
    block = b"\x5a" * int(rate_mb * 1024 * 1024 * step)
    nxt = time.monotonic()
    with open(path, "wb") as f:
        while True:
            try:
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    print(f"ENOSPC {time.time():.3f}", flush=True)
                    break
                raise
            nxt += step
            time.sleep(max(0.0, nxt - time.monotonic()))
    while True:
        time.sleep(3600)


def inodes(d: str, rate: float) -> None:
    os.makedirs(d, exist_ok=True)
    i = 0
    step = 0.1
    per = max(1, int(rate * step))
    nxt = time.monotonic()
    while True:
        try:
            for _ in range(per):
                fd = os.open(os.path.join(d, f"f{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
                i += 1
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                print(f"ENOSPC {time.time():.3f}", flush=True)
                break
            raise
        nxt += step
        time.sleep(max(0.0, nxt - time.monotonic()))
    while True:
        time.sleep(3600)


def sink(host: str, port: int) -> None:
    srv = socket.create_server((host, port))
    srv.settimeout(None)

    def serve(c: socket.socket) -> None:
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                if data.endswith(b"?"):
                    c.sendall(b"!" * 512)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def source(host: str, port: int, rate_kb: float) -> None:
    step = 0.05
    payload = b"d" * max(1, int(rate_kb * 1024 * step) - 1) + b"?"
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(10)
                nxt = time.monotonic()
                while True:
                    s.sendall(payload)
                    got = 0
                    while got < 512:
                        b = s.recv(4096)
                        if not b:
                            raise ConnectionError("closed")
                        got += len(b)
                    nxt += step
                    time.sleep(max(0.0, nxt - time.monotonic()))
        except OSError:
            time.sleep(1)


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "grow":
        grow(args[0], float(args[1]))
    elif cmd == "fill":
        fill(args[0], float(args[1]))
    elif cmd == "inodes":
        inodes(args[0], float(args[1]))
    elif cmd == "sink":
        sink(args[0], int(args[1]))
    elif cmd == "source":
        source(args[0], int(args[1]), float(args[2]))
    elif cmd == "spin":
        spin(float(args[0]))
    else:
        raise SystemExit(f"unknown worker {cmd!r}")


if __name__ == "__main__":
    main()

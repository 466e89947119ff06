"""The operator's CLI edges (issue 19): readable logs on a terminal and JSON with a syslog priority
elsewhere (journald's ``<N>`` prefix on its stream), Ctrl-C exits 130, ``heald once --window``
refuses nonsense, ``heald model evaluate`` shows a progress bar on a terminal only.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest


def agent_config(tmp_path: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n[model]\nenabled = false\n'
                      '[playbooks]\nload_shipped = false\ndirs = []\n[collect.gpu]\nenabled = false\n')
    return config


def read_pty(fd: int, proc: subprocess.Popen[bytes], *, stop_after_s: float | None = None) -> bytes:
    """Everything written to the pty until the process ends (SIGINT after ``stop_after_s``)."""
    buf = b""
    started = time.monotonic()
    os.set_blocking(fd, False)
    while True:
        if stop_after_s is not None and time.monotonic() - started > stop_after_s and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            stop_after_s = None
        try:
            chunk = os.read(fd, 65536)
            buf += chunk
        except BlockingIOError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        except OSError:  # EIO: the other side closed
            break
    return buf


def open_pty() -> tuple[int, int]:
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a real width
    return main, side


def test_console_logs_on_a_terminal_json_elsewhere_and_ctrl_c_exits_130(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    main, side = open_pty()
    proc = subprocess.Popen(["heald", "run", "--dry-run", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=side, stderr=subprocess.DEVNULL)
    os.close(side)
    text = read_pty(main, proc, stop_after_s=3).decode(errors="replace")
    os.close(main)
    assert proc.wait(30) == 130, "Ctrl-C: 130 (interrupted)"
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("heald start summary" in line for line in lines), text
    assert not [line for line in lines if line.lstrip().startswith("{")], "JSON on a terminal"
    assert "[info     ] heald starting" in text
    assert "priority=" not in text, "a person reads the level, not the syslog number"
    # the same, piped: JSON lines, each with its syslog priority, and SIGTERM is a clean 0
    proc2 = subprocess.Popen(["heald", "run", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    time.sleep(3)
    proc2.send_signal(signal.SIGTERM)
    out, _ = proc2.communicate(timeout=30)
    assert proc2.returncode == 0
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert records
    syslog = {"info": 6, "warning": 4, "error": 3, "debug": 7}
    assert all(r["priority"] == syslog[r["level"]] for r in records)


PRIORITIES = """
import os, sys
from agent.cli.base import configure_logging
import structlog
out = open(sys.argv[1], "w", buffering=1)
st = os.fstat(out.fileno())
if sys.argv[2] == "journal":
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
configure_logging("debug", "auto", stream=out)
log = structlog.get_logger("t")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("x")
"""


@pytest.mark.parametrize("where", ["file", "journal"])
def test_every_record_has_its_syslog_priority(tmp_path: Path, where: str) -> None:
    path = tmp_path / "log"
    subprocess.run([sys.executable, "-c", PRIORITIES, str(path), where], check=True, timeout=60)
    lines = path.read_text().splitlines()
    prefixes = [line[:3] for line in lines]
    if where == "journal":  # journald reads <N> as the priority and strips it (SyslogLevelPrefix=)
        assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<3>"]
        lines = [line[3:] for line in lines]
    else:
        assert not [p for p in prefixes if p.startswith("<")]
    records = [json.loads(line) for line in lines]
    assert [(r["event"], r["priority"]) for r in records] == [
        ("d", 7), ("i", 6), ("w", 4), ("e", 3), ("x", 3)]
    assert "ZeroDivisionError" in records[-1]["exception"]


@pytest.mark.parametrize("window", ["-1", "0", "nan", "inf", "1e9", "x"])
def test_once_refuses_a_nonsense_window(window: str) -> None:
    r = subprocess.run(["heald", "once", "--window", window], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "heald once: error: argument --window:" in r.stderr
    assert "Traceback" not in r.stderr


def datasets(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir()
    for name in ("a", "b"):
        train, test, label = rng.normal(size=(400, 4)), rng.normal(size=(300, 4)), np.zeros(300)
        test[200:220] += 8
        label[200:220] = 1
        np.savez(directory / f"{name}.npz", train=train, test=test, test_label=label)
    return directory


@pytest.mark.slow
def test_model_evaluate_shows_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    data = datasets(tmp_path / "data")
    main, side = open_pty()
    proc = subprocess.Popen(["heald", "model", "evaluate", str(data)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=side)
    os.close(side)
    bar = read_pty(main, proc).decode(errors="replace")
    os.close(main)
    assert proc.wait(120) == 0
    assert "b.npz: " in bar
    assert "1/2 files" in bar
    assert "done: 100%" in bar
    assert "2/2 files" in bar
    piped = subprocess.run(["heald", "model", "evaluate", str(data)], capture_output=True, text=True,
                           timeout=120, check=True)
    assert piped.stderr == "", "no bar (nor anything else) when stderr is not a terminal"
    assert "MEAN" in piped.stdout

"""The hash-chained audit log: any edited, removed or reordered line is found and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.act.audit import AuditLog, verify
from agent.cli.main import main


def write_log(path: Path, n: int = 6) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append({"type": "step", "playbook": "p", "i": i, "detail": f"line {i} ü"})
    log.close()


def test_intact_and_continues_across_reopen(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    write_log(p, 3)
    r = verify(p)
    assert r.ok
    assert r.lines == 6
    assert [json.loads(x)["seq"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def _mutate(p: Path, how: str) -> int:
    lines = p.read_text().splitlines(keepends=True)
    if how == "edit":
        e = json.loads(lines[2])
        e["record"]["detail"] = "nothing to see"
        lines[2] = json.dumps(e) + "\n"
        bad = 3
    elif how == "remove":
        del lines[3]
        bad = 4
    elif how == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
        bad = 2
    elif how == "truncate":
        del lines[-1]
        bad = len(lines) + 1
    elif how == "insert":
        lines.insert(1, lines[1])  # a duplicated line: its second copy breaks the chain
        bad = 3
    else:
        raise AssertionError(how)
    p.write_text("".join(lines))
    return bad


@pytest.mark.parametrize("how", ["edit", "remove", "reorder", "truncate", "insert"])
def test_tampering_is_detected_and_located(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p)
    assert main(["audit", "verify", str(p)]) == 0
    bad = _mutate(p, how)
    r = verify(p)
    assert not r.ok
    assert r.first_bad_line == bad, r
    capsys.readouterr()
    assert main(["audit", "verify", str(p), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["first_bad_line"] == bad
    assert main(["audit", "verify", str(p)]) == 1
    assert f"{p}:{bad}: TAMPERED" in capsys.readouterr().err


def test_missing_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_torn_tail_is_truncated_on_open(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    with p.open("ab") as fh:
        fh.write(b'{"seq": 4, "ts": 1, "pr')  # crash mid-append
    log = AuditLog(p)
    log.append({"type": "after-crash"})
    log.close()
    assert verify(p).ok


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=0, max_value=7),
    st.integers(min_value=0, max_value=200),
    st.binary(min_size=1, max_size=3),
)
def test_any_byte_change_is_detected(pos_line: int, pos: int, junk: bytes) -> None:
    import tempfile  # noqa: PLC0415 - hypothesis and function-scoped fixtures do not mix

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "audit.jsonl"
        write_log(p, 8)
        lines = p.read_bytes().splitlines(keepends=True)
        line = lines[pos_line]
        i = pos % (len(line) - 1)
        new = line[:i] + junk + line[i + len(junk) :]
        if new == line:
            return
        lines[pos_line] = new
        p.write_bytes(b"".join(lines))
        r = verify(p)
        assert not r.ok
        assert r.first_bad_line is not None
        assert r.first_bad_line <= pos_line + 1

"""The fault-harness recordings in bench/faults/data/ are the ones their checksums and README name."""

from __future__ import annotations

import hashlib
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
DATA = TOP / "bench" / "faults" / "data"


def checksums() -> dict[str, str]:
    """``SHA256SUMS`` in ``sha256sum`` format: ``<64 hex>  <name>`` (or `` *<name>``) per line."""
    sums = {}
    for line in (DATA / "SHA256SUMS").read_text(encoding="ascii").splitlines():
        digest, mode, name = line[:64], line[64:66], line[66:]
        assert mode in {"  ", " *"}, f"not a sha256sum line: {line!r}"
        assert all(c in "0123456789abcdef" for c in digest), f"not a sha256 digest: {line!r}"
        sums[name] = digest
    return sums


def test_every_recording_matches_its_checksum() -> None:
    sums = checksums()
    for name, digest in sums.items():
        path = DATA / name
        assert path.is_file(), f"SHA256SUMS names {name}, which is missing"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == digest, f"{name} changed: sha256 {actual}, SHA256SUMS says {digest}"


def test_every_recording_is_listed_and_described() -> None:
    sums = checksums()
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    recordings = sorted(p.name for p in DATA.glob("*.npz"))
    assert recordings, "no recordings found"
    assert sorted(sums) == recordings, "SHA256SUMS and the recordings in bench/faults/data/ differ"
    for name in recordings:
        assert f"`{name}`" in readme, f"bench/faults/data/README.md does not describe {name}"


def test_no_evaluation_outputs_in_the_data_folder() -> None:
    """evaluate.py writes to bench/results/faults/; the data folder holds recordings only."""
    extra = sorted(p.name for p in DATA.iterdir() if p.name not in {"SHA256SUMS", "README.md"}
                   and p.suffix != ".npz")
    assert not extra, f"not recordings: {extra}"

"""Command signing: every kind of bad command is refused with its own typed error."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import HealdError, WireError
from agent.wire import decode_command, encode
from agent.wire.messages import Command
from agent.wire.signing import (
    REJECTION_REASONS,
    CommandBadSignature,
    CommandExpired,
    CommandOtherNode,
    CommandOutsideWindow,
    CommandRejected,
    CommandReplayed,
    CommandSigner,
    CommandUnsigned,
    CommandVerifier,
    NonceCache,
    SigningKeyError,
    canonical_bytes,
    key_id,
    load_or_create_private_key,
    load_public_key,
    parse_public_key,
    public_key_text,
    sign,
)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signer(key: Ed25519PrivateKey, clock: Clock) -> CommandSigner:
    return CommandSigner(key, ttl_s=60, clock=clock)


@pytest.fixture
def verifier(key: Ed25519PrivateKey, clock: Clock, tmp_path: Path) -> CommandVerifier:
    return CommandVerifier(
        [key.public_key()],
        node="n1",
        site="s1",
        nonces=NonceCache(tmp_path / "nonces", clock=clock),
        clock=clock,
    )


def wire_roundtrip(cmd: Command) -> Command:
    """What the agent actually sees: the command after msgpack encoding and decoding."""
    return decode_command(encode(cmd))


def test_valid_command_verifies_once(signer: CommandSigner, verifier: CommandVerifier) -> None:
    cmd = wire_roundtrip(signer.make(node="n1", site="s1", name="approve", args={"run_id": "r1", "n": 2}))
    assert verifier.verify(cmd) == cmd
    with pytest.raises(CommandReplayed) as exc:
        verifier.verify(cmd)
    assert exc.value.reason == "replayed"
    assert exc.value.command_id == cmd.id


def test_unsigned(signer: CommandSigner, verifier: CommandVerifier) -> None:
    cmd = msgspec.structs.replace(signer.make(node="n1", site="s1", name="run"), signature=b"")
    with pytest.raises(CommandUnsigned):
        verifier.verify(wire_roundtrip(cmd))


@pytest.mark.parametrize("field", ["name", "node", "args", "expires_at", "issued_at", "nonce", "seq", "id"])
def test_tampered(signer: CommandSigner, verifier: CommandVerifier, field: str) -> None:
    cmd = signer.make(node="n1", site="s1", name="run", args={"playbook": "a"})
    changes: dict[str, object] = {
        "name": "deny",
        "node": "*",
        "args": {"playbook": "b"},
        "expires_at": cmd.expires_at + 1,
        "issued_at": cmd.issued_at - 1,
        "nonce": bytes(16),
        "seq": cmd.seq + 1,
        "id": "other",
    }
    bad = msgspec.structs.replace(cmd, **{field: changes[field]})
    with pytest.raises(CommandBadSignature):
        verifier.verify(wire_roundtrip(bad))


def test_signed_by_another_key(clock: Clock, verifier: CommandVerifier) -> None:
    rogue = CommandSigner(Ed25519PrivateKey.generate(), clock=clock)
    with pytest.raises(CommandBadSignature):
        verifier.verify(rogue.make(node="n1", site="s1", name="run"))
    # ... even when it claims to be the trusted issuer
    forged = CommandSigner(Ed25519PrivateKey.generate(), issuer=next(iter(verifier.keys)), clock=clock)
    with pytest.raises(CommandBadSignature):
        verifier.verify(forged.make(node="n1", site="s1", name="run"))


def test_expired(signer: CommandSigner, verifier: CommandVerifier, clock: Clock) -> None:
    cmd = signer.make(node="n1", site="s1", name="run", ttl_s=10)
    clock.t += 10 + verifier.max_skew_s + 1
    with pytest.raises(CommandExpired):
        verifier.verify(cmd)


def test_within_skew_is_accepted(signer: CommandSigner, verifier: CommandVerifier, clock: Clock) -> None:
    cmd = signer.make(node="n1", site="s1", name="run", ttl_s=10)
    clock.t += 10 + verifier.max_skew_s - 1
    verifier.verify(cmd)


def test_issued_in_future(signer: CommandSigner, verifier: CommandVerifier, clock: Clock) -> None:
    cmd = signer.make(node="n1", site="s1", name="run")
    clock.t -= verifier.max_skew_s + 5
    with pytest.raises(CommandOutsideWindow):
        verifier.verify(cmd)


def test_lifetime_too_long(signer: CommandSigner, verifier: CommandVerifier) -> None:
    cmd = signer.make(node="n1", site="s1", name="run", ttl_s=verifier.max_lifetime_s + 1)
    with pytest.raises(CommandOutsideWindow):
        verifier.verify(cmd)


@pytest.mark.parametrize(("node", "site"), [("n2", "s1"), ("n1", "s2"), ("n2", "*")])
def test_other_node(signer: CommandSigner, verifier: CommandVerifier, node: str, site: str) -> None:
    with pytest.raises(CommandOtherNode):
        verifier.verify(signer.make(node=node, site=site, name="run"))


def test_broadcast(
    signer: CommandSigner, verifier: CommandVerifier, key: Ed25519PrivateKey, clock: Clock
) -> None:
    verifier.verify(signer.make(node="*", site="*", name="silence"))
    strict = CommandVerifier([key.public_key()], node="n1", site="s1", allow_broadcast=False, clock=clock)
    with pytest.raises(CommandOtherNode):
        strict.verify(signer.make(node="*", site="s1", name="silence"))


def test_replay_survives_restart(
    signer: CommandSigner, key: Ed25519PrivateKey, clock: Clock, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "nonces"
    cmd = signer.make(node="n1", site="s1", name="run")
    first = CommandVerifier(
        [key.public_key()], node="n1", site="s1", nonces=NonceCache(path, clock=clock), clock=clock
    )
    first.verify(cmd)
    assert path.exists()
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = CommandVerifier(
        [key.public_key()], node="n1", site="s1", nonces=NonceCache(path, clock=clock), clock=clock
    )
    with pytest.raises(CommandReplayed):
        again.verify(cmd)


def test_corrupt_nonce_file_fails_closed(
    signer: CommandSigner, key: Ed25519PrivateKey, clock: Clock, tmp_path: Path
) -> None:
    path = tmp_path / "nonces"
    old = signer.make(node="n1", site="s1", name="run")
    path.write_bytes(b"\xc1garbage")
    clock.t += 1
    cache = NonceCache(path, clock=clock)
    assert cache.recovered_from_corruption
    v = CommandVerifier([key.public_key()], node="n1", site="s1", nonces=cache, clock=clock)
    with pytest.raises(CommandOutsideWindow):
        v.verify(old)  # might have been executed before the file was lost
    clock.t += 1
    v.verify(signer.make(node="n1", site="s1", name="run"))  # new commands still work


def test_bounded_cache_evicts_safely(signer: CommandSigner, key: Ed25519PrivateKey, clock: Clock) -> None:
    cache = NonceCache(capacity=3, clock=clock)
    v = CommandVerifier([key.public_key()], node="n1", site="s1", nonces=cache, clock=clock)
    cmds = []
    for _ in range(5):
        clock.t += 1
        cmds.append(signer.make(node="n1", site="s1", name="run"))
    for cmd in cmds:
        v.verify(cmd)
    assert len(cache) == 3
    for cmd in cmds[:2]:  # evicted: refused by the floor, not replayable
        with pytest.raises(CommandOutsideWindow):
            v.verify(cmd)
    for cmd in cmds[2:]:
        with pytest.raises(CommandReplayed):
            v.verify(cmd)


def test_expired_nonces_are_forgotten(signer: CommandSigner, verifier: CommandVerifier, clock: Clock) -> None:
    verifier.verify(signer.make(node="n1", site="s1", name="run", ttl_s=5))
    clock.t += 5 + verifier.max_skew_s + 1
    verifier.verify(signer.make(node="n1", site="s1", name="run", ttl_s=5))
    verifier.nonces._prune()
    assert len(verifier.nonces) == 1


def test_errors_are_typed() -> None:
    assert set(REJECTION_REASONS) == {
        "unsigned",
        "bad_signature",
        "other_node",
        "expired",
        "issued_at_window",
        "replayed",
    }
    for cls in (
        CommandUnsigned,
        CommandBadSignature,
        CommandExpired,
        CommandOutsideWindow,
        CommandReplayed,
        CommandOtherNode,
    ):
        assert issubclass(cls, CommandRejected)
        assert issubclass(cls, WireError)
        assert issubclass(cls, HealdError)


def test_keys(tmp_path: Path) -> None:
    path = tmp_path / "k" / "command-key.pem"
    key = load_or_create_private_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert key_id(load_or_create_private_key(path).public_key()) == key_id(key.public_key())
    text = public_key_text(key.public_key())
    assert key_id(parse_public_key(text)) == key_id(key.public_key())
    (tmp_path / "pub").write_text(text + "\n")
    assert key_id(load_public_key(tmp_path / "pub")) == key_id(key.public_key())
    with pytest.raises(SigningKeyError):
        parse_public_key("bm90IGEga2V5")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(SigningKeyError):
        load_or_create_private_key(tmp_path / "bad.pem")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),  # the wire carries finite floats only
)


@settings(max_examples=50, deadline=None)
@given(args=st.dictionaries(st.text(max_size=10), scalars, max_size=6))
def test_canonical_bytes_independent_of_order(args: dict[str, object]) -> None:
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    cmd = signer.make(node="n1", site="s1", name="run", args=args)  # type: ignore[arg-type]
    reordered = msgspec.structs.replace(cmd, args=dict(reversed(list(cmd.args.items()))))
    assert canonical_bytes(cmd) == canonical_bytes(reordered)
    assert canonical_bytes(wire_roundtrip(cmd)) == canonical_bytes(cmd)
    key.public_key().verify(wire_roundtrip(cmd).signature, canonical_bytes(cmd))


def test_sign_replaces_signature(key: Ed25519PrivateKey, signer: CommandSigner) -> None:
    cmd = signer.make(node="n1", site="s1", name="x")
    assert sign(cmd, key).signature == cmd.signature  # Ed25519 is deterministic

"""A private mosquitto per test, and test TLS material.

Fixtures (registered for every test by tests/conftest.py):

``mosquitto``
    A started broker on a free 127.0.0.1 port: anonymous access, persistence off. It has
    ``host``, ``port``, ``stop()``, ``start()`` (same port, for outage tests), ``restart()`` and
    ``log_text()``.
``mosquitto_factory``
    ``mosquitto_factory(config_text, start=True)`` starts a broker from your own config. The text
    may use ``{port}`` and ``{dir}`` (a private directory for persistence, logs, ACL files);
    :func:`default_config` gives the base text to extend (``persistence=True``: the broker
    persistence docs/mqtt-tls-acl.md tells operators to enable, saved in ``{dir}``).
``Subscriber`` (a helper, not a fixture)
    ``async with Subscriber(broker) as sub``: collects decoded heald messages, reconnecting
    across broker restarts; ``client_id=`` for a persistent session.
``tls_certs``
    Session-scoped CA, server (127.0.0.1/localhost) and client certificates, plus a second,
    unrelated CA for "wrong CA" tests (:class:`TlsCerts`).

Every broker is killed and reaped at teardown: tests never rely on PID 1 to reap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import aiomqtt
import pytest

from agent import wire

M = TypeVar("M", bound=wire.Envelope)
MOSQUITTO = os.environ.get("HEALD_TEST_MOSQUITTO", "/usr/sbin/mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The broker persistence of docs/mqtt-tls-acl.md, in the broker's private ``{dir}`` (saved every
#: second here, so that a test's ``kill()`` loses as little as a real broker's crash would).
PERSISTENCE: Final = (
    "persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
    "max_queued_messages 100000\nmax_queued_bytes 268435456\n"
)


def default_config(extra: str = "", *, persistence: bool = False) -> str:
    """Base config: one 127.0.0.1 listener on ``{port}``, anonymous, no persistence (with
    ``persistence``, :data:`PERSISTENCE`: sessions and their queues survive a restart)."""
    user = "user root\n" if os.geteuid() == 0 else ""  # do not drop to 'mosquitto': it could not read {dir}
    persist = PERSISTENCE if persistence else "persistence false\n"
    return (
        f"{user}listener {{port}} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"{persist}"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        "connection_messages true\n"
        f"{extra}"
    )


@dataclass
class Broker:
    """One mosquitto process with a fixed port and config; restartable."""

    config_text: str
    dir: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def conf_path(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.conf_path.write_text(self.config_text.format(port=self.port, dir=self.dir))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on {self.port} in {timeout}s:\n"
                           f"{self.log_text()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves persistence, if configured), then SIGKILL; always reaped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    brokers: list[Broker] = []

    def make(config_text: str | None = None, *, start: bool = True) -> Broker:
        broker = Broker(config_text if config_text is not None else default_config(),
                        tmp_path_factory.mktemp("mosquitto"), free_port())
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: BrokerFactory) -> Broker:
    return mosquitto_factory()


# ---------------------------------------------------------------------------------------- TLS
@dataclass(frozen=True)
class TlsCerts:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verifying the server against it fails


def _write_certs(out: Path) -> TlsCerts:
    from cryptography import x509  # noqa: PLC0415  (only TLS tests pay for it)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, *,
             server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca = make_ca("heald test CA")
    _, other = make_ca("unrelated CA")
    skey, scert = leaf("127.0.0.1", ca_key, ca, server=True)
    ckey, ccert = leaf("test-node", ca_key, ca, server=False)
    pem = serialization.Encoding.PEM
    files = {
        "ca.pem": ca.public_bytes(pem), "other-ca.pem": other.public_bytes(pem),
        "server.pem": scert.public_bytes(pem), "server.key": key_pem(skey),
        "client.pem": ccert.public_bytes(pem), "client.key": key_pem(ckey),
    }
    for fname, data in files.items():
        (out / fname).write_bytes(data)
        (out / fname).chmod(0o600)
    return TlsCerts(out, out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem",
                    out / "client.key", out / "other-ca.pem")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    return _write_certs(tmp_path_factory.mktemp("tls"))


def tls_listener_config(certs: TlsCerts, *, require_certificate: bool = True) -> str:
    """A TLS-only broker config (mTLS when ``require_certificate``) for :func:`mosquitto_factory`."""
    user = "user root\n" if os.geteuid() == 0 else ""
    return (
        f"{user}listener {{port}} 127.0.0.1\n"
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
        "allow_anonymous true\npersistence false\nlog_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    )


# ------------------------------------------------------------------------------ subscriber
class Subscriber:
    """Collects decoded heald messages from a broker; reconnects across broker restarts.

    With ``client_id`` it keeps a persistent session (clean_session false, QoS 1): a broker with
    persistence keeps queueing for it while it is disconnected, so an outage test cannot lose
    messages on the subscriber's side of the race.
    """

    def __init__(self, broker: Broker, topic: str = "heald/v1/#", *, client_id: str | None = None,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.broker = broker
        self.topic = topic
        self.client_id = client_id
        self.tls_context = tls_context
        self.received: list[tuple[str, wire.Message, bool]] = []  # (topic, message, retained)
        self.undecodable: list[tuple[str, bytes]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name="test-subscriber")
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=self.client_id,
                                          clean_session=self.client_id is None,
                                          tls_context=self.tls_context, timeout=3) as client:
                    await client.subscribe(self.topic, qos=1)
                    self._ready.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        try:
                            self.received.append((m.topic.value, wire.decode(payload), m.retain))
                        except wire.WireError:
                            self.undecodable.append((m.topic.value, payload))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def of(self, cls: type[M], node: str | None = None) -> list[M]:
        return [m for _, m, _ in self.received if isinstance(m, cls) and (node is None or m.node == node)]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                kinds = [wire.kind_of(m) for _, m, _ in self.received[-20:]]
                raise AssertionError(f"timed out after {within}s waiting for {what or predicate}; "
                                     f"{len(self.received)} received, last kinds {kinds}")
            await asyncio.sleep(0.02)

"""The broker fixture itself: starts, stops, restarts on the same port, reaps."""

from __future__ import annotations

import socket

from broker import Broker, BrokerFactory, TlsCerts, tls_listener_config


def accepts(broker: Broker) -> bool:
    try:
        with socket.create_connection((broker.host, broker.port), timeout=0.5):
            return True
    except OSError:
        return False


def test_mosquitto_stop_start_same_port(mosquitto: Broker) -> None:
    assert accepts(mosquitto)
    port = mosquitto.port
    proc = mosquitto.proc
    mosquitto.stop()
    assert proc is not None
    assert proc.returncode is not None  # reaped
    assert not accepts(mosquitto)
    mosquitto.start()
    assert mosquitto.port == port
    assert accepts(mosquitto)


def test_factory_tls_config(mosquitto_factory: BrokerFactory, tls_certs: TlsCerts) -> None:
    broker = mosquitto_factory(tls_listener_config(tls_certs))
    assert accepts(broker)
    assert "require_certificate true" in broker.conf_path.read_text()

"""TLS for the MQTT session (``[mqtt.tls]``)."""

from __future__ import annotations

import socket
import ssl

from agent.report.settings import TlsSettings


class TlsContext(ssl.SSLContext):
    """An SSLContext that remembers the sockets it wraps.

    paho-mqtt does not close the socket when the TLS handshake fails (e.g. certificate verify
    failed): it would leak until garbage collection, one per reconnect attempt. The reporter
    closes every socket of a session when the session ends (closing twice is harmless).
    """

    _wrapped: list[ssl.SSLSocket]

    def wrap_socket(  # noqa: PLR0917  (the signature of ssl.SSLContext.wrap_socket)
        self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                      server_hostname, session)
        self.__dict__.setdefault("_wrapped", []).append(wrapped)
        return wrapped

    def close_wrapped(self) -> None:
        for sock in self.__dict__.pop("_wrapped", []):
            sock.close()



def client_context(tls: TlsSettings) -> TlsContext | None:
    """The client's TLS context from ``[mqtt.tls]``; None without TLS (OSError/SSLError for bad files)."""
    if not tls.enabled:
        return None
    ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx

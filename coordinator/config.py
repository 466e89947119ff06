"""coordinator.toml: validated into frozen typed settings.

Every section is optional; with no file at all the coordinator runs an embedded broker on
127.0.0.1:1883, SQLite under ``state_dir`` and the dashboard on 127.0.0.1:8080 — but a password
or token is always required for the dashboard (there is no anonymous mode).

Errors name the file, the line and the dotted key (``coordinator.toml:12: [web.listen] ...``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from agent.errors import Problem, toml_key_lines
from coordinator.errors import CoordinatorConfigError

DEFAULT_CONFIG = Path("/etc/heald/coordinator.toml")

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
#: MQTT protocol choice; 5 also as a number, so that ``protocol = 5`` means what it says.
MqttProtocol = Literal["auto", "5", "3.1.1", 5]
#: The largest MQTT 5 session expiry interval: 0xFFFFFFFF means "never expires".
MAX_SESSION_EXPIRY_S = 0xFFFFFFFF


class CoordinatorSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # The SQLite database, the signing key and the embedded broker's data live here.
    state_dir: str = "/var/lib/heald-coordinator"
    # Names this replica in logs, the API and the audit trail. Default: "<hostname>-<pid>".
    replica_id: str = ""


class MqttSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Empty host: start the embedded broker (amqtt) on embedded_listen and connect to it.
    host: str = ""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password_file: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # "" = "heald-coordinator-<replica_id>" (the host name when replica_id is not set): stable
    # across restarts, so the broker keeps this replica's session. Replicas need distinct ids.
    client_id: str = ""
    # "auto": MQTT 5, or 3.1.1 from the first time a broker refuses 5 until the coordinator
    # restarts (the embedded broker speaks only 3.1.1); "5" or "3.1.1": only that one.
    protocol: MqttProtocol = "auto"
    # false: a persistent session. The broker keeps this replica's subscriptions and queues the
    # QoS 1 reports that arrive while it is away (restarting, or the broker restarting).
    clean_start: bool = False
    # How long the broker keeps that session after a disconnect (MQTT 5; a 3.1.1 broker keeps it
    # until its own limit, mosquitto's persistent_client_expiration).
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_SESSION_EXPIRY_S)] = 86400
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    # Non-empty: several replicas share the reports via $share/<share_group>/... subscriptions.
    share_group: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9_.-]{1,64})?$")] = ""
    embedded_listen: str = "127.0.0.1:1883"
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024
    backoff_max_s: PositiveFloat = 10.0


class StoreSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # "" = SQLite at <state_dir>/coordinator.db; "sqlite:///path"; or "postgresql://user@host/db".
    url: str = ""
    # Metric samples older than this are deleted (bounded history).
    metrics_retention_s: Annotated[float, msgspec.Meta(ge=60)] = 6 * 3600.0
    # Risk history older than this is deleted. Events, actions and the audit trail are kept.
    risk_retention_s: Annotated[float, msgspec.Meta(ge=60)] = 7 * 86400.0
    # Metrics per node kept at most (newest first), whatever their age.
    metrics_max_rows_per_node: Annotated[int, msgspec.Meta(ge=10)] = 5000
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000
    batch_interval_s: Annotated[float, msgspec.Meta(ge=0.001, le=5)] = 0.05
    # PostgreSQL: batches committed at once, each in its own transaction on its own connection, so
    # that one batch's statements run while the next is prepared (a node's rows are locked: its
    # reports still apply one batch at a time). SQLite has one writer: 1 whatever is set here.
    writers: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    # Reports received and not yet stored, at most: beyond it metrics are shed (counted per node in
    # /api/info, logged), other reports only beyond a quarter more (coordinator/intake.py).
    queue_max: Annotated[int, msgspec.Meta(ge=100)] = 20_000
    prune_interval_s: Annotated[float, msgspec.Meta(ge=1)] = 60.0
    # A node not heard from for this long is shown offline even without its will.
    stale_after_s: Annotated[float, msgspec.Meta(ge=5)] = 120.0


class WebSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # host:port. Loopback by default; set "0.0.0.0:8080" (behind TLS) to expose it.
    listen: str = "127.0.0.1:8080"
    # Login secrets: a password for people, bearer tokens for the CLI/scripts (either works for both).
    password: str | None = None
    password_file: str | None = None
    tokens: list[str] = msgspec.field(default_factory=list)
    token_file: str | None = None
    session_ttl_s: Annotated[float, msgspec.Meta(ge=60)] = 12 * 3600.0
    # Mark the session cookie Secure (set when served over HTTPS, e.g. behind a TLS proxy).
    secure_cookie: bool = False
    # How often the live stream polls the store for changes made by other replicas.
    stream_poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=30)] = 0.5
    page_max: Annotated[int, msgspec.Meta(ge=10, le=10_000)] = 500
    # Login throttling, per client address (an IPv6 client by its /64), per replica: this many
    # wrong secrets (login form or bearer token) in a row lock the client out for
    # login_lockout_s, doubling with each further failure up to login_lockout_max_s. A right
    # secret, or login_window_s without a failure (after the last one or the lockout's end),
    # forgets the client's failures.
    login_max_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    login_window_s: Annotated[float, msgspec.Meta(ge=1)] = 900.0
    login_lockout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    login_lockout_max_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 900.0
    # Clients tracked at most (least recently seen forgotten first): bounds the memory a flood
    # of distinct addresses can take.
    login_tracked_max: Annotated[int, msgspec.Meta(ge=10, le=10_000_000)] = 10_000
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For names the client. Empty (the
    # default): the header is ignored and the TCP peer is the client.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class SigningSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Ed25519 private key (PEM); created 0600 on first start. Default: <state_dir>/command-key.pem.
    key_file: str = ""
    command_ttl_s: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 300.0


class BudgetSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Group nodes by "site" or by a label ("label:rack").
    group_by: Annotated[str, msgspec.Meta(pattern=r"^(site|label:[A-Za-z0-9_.-]+)$")] = "site"
    # At most this many nodes of a group hold a lease at once ...
    max_nodes: Annotated[int, msgspec.Meta(ge=1)] = 2
    # ... and at most this share of the group (whichever is smaller; at least 1 node).
    max_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 10.0
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=5, le=86400)] = 600.0
    # Storm: the same playbook asked for by more than this share of a group within the window
    # holds every request for it in that group and raises one fleet escalation.
    storm_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2
    storm_window_s: Annotated[float, msgspec.Meta(ge=1)] = 300.0
    # ... but never for fewer distinct nodes than this (a group of 3 is not a storm at 1 node).
    storm_min_nodes: Annotated[int, msgspec.Meta(ge=1)] = 3


#: Notification severities, lowest first.
SEVERITIES: Final = ("info", "warning", "critical")
Severity = Literal["info", "warning", "critical"]
NoticeKind = Literal["escalation", "approval", "offline"]


class NotifyRoute(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Names the route in logs and in the outbox (a route's sends are deduplicated under its name).
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    # http:// or https://. Alertmanager: its base URL (the alerts go to <url>/api/v2/alerts).
    url: str
    # "webhook": heald's JSON; "slack": {"text": ...} (Slack-compatible incoming webhooks);
    # "alertmanager": Prometheus Alertmanager's API v2, with resolves.
    kind: Literal["webhook", "slack", "alertmanager"] = "webhook"
    # Notices below this severity are not sent on this route ...
    min_severity: Severity = "info"
    # ... nor those of other kinds.
    events: list[NoticeKind] = msgspec.field(default_factory=lambda: ["escalation", "approval", "offline"])
    # Also send when it is over (escalation resolved, approval decided, node back online).
    send_resolved: bool = True
    # A file holding a bearer token sent as "Authorization: Bearer <token>" (never logged).
    bearer_token_file: str | None = None


class NotifySeverity(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    escalation: Severity = "critical"
    approval: Severity = "warning"
    offline: Severity = "warning"


class NotifySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Where notices go; none (the default): nothing is sent.
    routes: list[NotifyRoute] = msgspec.field(default_factory=list)
    # The severity of each kind of notice (routes filter on it).
    severity: NotifySeverity = NotifySeverity()
    # How often the store is looked at for new escalations, approvals and offline nodes.
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 2.0
    # A failed send is retried after backoff_s, doubling up to backoff_max_s (with jitter), and
    # given up (and counted) after max_attempts; a 4xx answer other than 408/429 at once.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    backoff_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600)] = 1.0
    backoff_max_s: Annotated[float, msgspec.Meta(ge=0.01, le=86400)] = 300.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    # Alertmanager forgets an alert that is not sent again: firing ones are sent again this often
    # (their endsAt 4 times this ahead), as Prometheus does.
    alertmanager_refresh_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0


class LogSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class CoordinatorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    coordinator: CoordinatorSection = CoordinatorSection()
    mqtt: MqttSection = MqttSection()
    store: StoreSection = StoreSection()
    web: WebSection = WebSection()
    signing: SigningSection = SigningSection()
    budget: BudgetSection = BudgetSection()
    log: LogSection = LogSection()
    notify: NotifySection = NotifySection()

    @property
    def state_dir(self) -> Path:
        return Path(self.coordinator.state_dir)

    @property
    def replica_id(self) -> str:
        return self.coordinator.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def key_path(self) -> Path:
        return Path(self.signing.key_file) if self.signing.key_file else self.state_dir / "command-key.pem"

    @property
    def store_url(self) -> str:
        # sqlite:///PATH names the absolute PATH; a relative state_dir is taken from the current directory
        return self.store.url or f"sqlite://{(self.state_dir / 'coordinator.db').absolute()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.mqtt.host

    @property
    def mqtt_client_id(self) -> str:
        """This replica's MQTT client id: the same after a restart, so its session survives it."""
        name = self.coordinator.replica_id or socket.gethostname()
        return self.mqtt.client_id or f"heald-coordinator-{name}"[:64]


def _host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def parse_listen(value: str) -> tuple[str, int]:
    parsed = _host_port(value)
    if parsed is None:
        raise ValueError(f"{value!r} is not host:port")
    return parsed


def loopback_problem(host: str) -> str | None:
    """Why the embedded broker must not listen on ``host``, or None: it has no authentication and
    no TLS, so it binds loopback only. The one rule for ``check`` and for start-up
    (:func:`coordinator.broker.check_loopback`)."""
    if host == "localhost":
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"embedded broker address {host!r} must be a loopback IP (127.0.0.1)"
    if not ip.is_loopback:
        return (
            f"the embedded broker has no authentication, so it binds loopback only; "
            f"{host} is not loopback (run mosquitto for remote agents)"
        )
    return None


#: The shortest login secret accepted (password or token: either logs in).
MIN_SECRET_LENGTH = 12
#: ... and the fewest distinct characters in it ("aaaaaaaaaaaa" is 12 characters long).
MIN_SECRET_DISTINCT = 5
GENERATE_HINT = "`heald-coordinator password` prints a random one"


def secret_problem(secret: str) -> str | None:
    """Why a login secret is too weak to accept, or None. Never quotes the secret."""
    if len(secret) < MIN_SECRET_LENGTH:
        return f"is {len(secret)} characters long; use at least {MIN_SECRET_LENGTH} ({GENERATE_HINT})"
    if len(set(secret)) < MIN_SECRET_DISTINCT:
        return f"repeats {len(set(secret))} characters; use a random secret ({GENERATE_HINT})"
    return None


def _secret_problems(web: WebSection) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if web.password and (why := secret_problem(web.password)):
        out.append(("web.password", f"the dashboard password {why}"))
    for i, token in enumerate(web.tokens, 1):
        if token and (why := secret_problem(token)):
            out.append(("web.tokens", f"token {i} of {len(web.tokens)} {why}"))
    return out


def _web_problems(web: WebSection) -> list[tuple[str, str]]:
    out = _secret_problems(web)
    if web.login_lockout_max_s < web.login_lockout_s:
        out.append(("web.login_lockout_max_s", "must be at least login_lockout_s"))
    for value in web.trusted_proxies:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            out.append(("web.trusted_proxies", f"{value!r} is not an IP address or network"))
    return out


def _semantic_problems(settings: CoordinatorSettings) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in (
        ("web.listen", settings.web.listen),
        ("mqtt.embedded_listen", settings.mqtt.embedded_listen),
    ):
        if _host_port(value) is None:
            out.append((key, f"{value!r} is not host:port"))
    embedded = _host_port(settings.mqtt.embedded_listen)
    if settings.embedded_broker and embedded and (why := loopback_problem(embedded[0])):
        out.append(("mqtt.embedded_listen", why))
    url = settings.store.url
    if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        out.append(("store.url", f"{url!r}: use sqlite:///PATH or postgresql://user@host/db"))
    if settings.embedded_broker and settings.mqtt.share_group:
        out.append(("mqtt.share_group", "shared subscriptions need an external broker (set mqtt.host)"))
    elif settings.mqtt.share_group and not (settings.mqtt.client_id or settings.coordinator.replica_id):
        out.append(
            (
                "mqtt.share_group",
                (
                    "replicas need distinct MQTT client ids (or they take each other's session over): "
                    "set coordinator.replica_id (or mqtt.client_id) on each"
                ),
            )
        )
    if settings.web.enabled and not (
        settings.web.password or settings.web.password_file or settings.web.tokens or settings.web.token_file
    ):
        out.append(
            (
                "web",
                (
                    "the dashboard needs a login secret: set password, password_file, tokens or "
                    f"token_file (there is no anonymous mode; {GENERATE_HINT})"
                ),
            )
        )
    out += _web_problems(settings.web)
    out += _notify_problems(settings.notify)
    return out


def _notify_problems(notify: NotifySection) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    names: set[str] = set()
    for route in notify.routes:
        if route.name in names:
            out.append(("notify.routes", f"route name {route.name!r} is used twice"))
        names.add(route.name)
        if not re.match(r"^https?://[^/\s]+", route.url):
            out.append(("notify.routes", f"route {route.name!r}: url {route.url!r} is not an http(s) URL"))
    if notify.backoff_max_s < notify.backoff_s:
        out.append(("notify.backoff_max_s", "must be at least backoff_s"))
    return out


def loads(text: str, origin: str = "<config>") -> CoordinatorSettings:
    lines = toml_key_lines(text)

    def problem(key: str, message: str) -> Problem:
        look = key
        while look and look not in lines and "." in look:
            look = look.rsplit(".", 1)[0]
        return Problem(file=origin, key=key, message=message, line=lines.get(look))

    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise CoordinatorConfigError(
            [Problem(origin, "", f"not valid TOML: {exc}", int(m.group(1)) if m else None)]
        ) from None
    try:
        settings = msgspec.convert(raw, CoordinatorSettings)
    except msgspec.ValidationError as exc:
        detail, _, at = str(exc).partition(" - at `$")
        key = at.rstrip("`").lstrip(".").replace("[", ".").replace("]", "")
        if detail.startswith("Object contains unknown field"):
            field = detail.split("`")[1]
            key = f"{key}.{field}" if key else field
            detail = f"unknown key '{field}'"
        raise CoordinatorConfigError([problem(key, detail)]) from None
    problems = [problem(k, m) for k, m in _semantic_problems(settings)]
    if problems:
        raise CoordinatorConfigError(problems)
    return settings


def load(path: Path | None) -> CoordinatorSettings:
    """Load ``path`` (or defaults when ``path`` is None)."""
    if path is None:
        return loads("", "<defaults>")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CoordinatorConfigError([Problem(str(path), "", f"cannot read: {exc.strerror}")]) from None
    return loads(text, str(path))


def read_secret_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CoordinatorConfigError([Problem(path, what, f"cannot read: {exc.strerror}")]) from None


def notify_tokens(notify: NotifySection) -> dict[str, str]:
    """Each notify route's bearer token, by route name, from the files named; a
    :class:`CoordinatorConfigError` for a file that cannot be read or is empty."""
    out: dict[str, str] = {}
    for route in notify.routes:
        if route.bearer_token_file:
            token = read_secret_file(route.bearer_token_file, "notify.routes.bearer_token_file")
            if not token:
                raise CoordinatorConfigError(
                    [Problem(route.bearer_token_file, "notify.routes.bearer_token_file", "is empty")]
                )
            out[route.name] = token
    return out


def login_secrets(settings: CoordinatorSettings) -> tuple[list[str], list[str]]:
    """(passwords, tokens) from the config and the files it names.

    Raises :class:`CoordinatorConfigError` for a file that cannot be read or holds a secret
    too weak to accept (``heald-coordinator check`` and ``run`` call this before anything else).
    """
    web = settings.web
    problems: list[Problem] = []
    passwords = [p for p in (web.password,) if p]
    if web.password_file:
        password = read_secret_file(web.password_file, "web.password_file")
        if why := secret_problem(password):
            problems.append(Problem(web.password_file, "web.password_file", f"the dashboard password {why}"))
        passwords.append(password)
    tokens = [t for t in web.tokens if t]
    if web.token_file:
        lines = read_secret_file(web.token_file, "web.token_file").splitlines()
        for n, line in enumerate(lines, 1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if why := secret_problem(token):
                problems.append(Problem(web.token_file, "web.token_file", f"the token {why}", n))
            tokens.append(token)
    if problems:
        raise CoordinatorConfigError(problems)
    return passwords, tokens

"""``heald-coordinator``: run the coordinator, check its config, print its command-signing key
or a new dashboard password.

Exit codes, error lines and logging are ``heald``'s own (:mod:`agent.cli.base`): 0 ok,
1 failure, 2 bad input (config, arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cli.base import EXIT_CODES_EPILOG, block_optional_imports, configure_logging, out, run_handler
from coordinator import __version__
from coordinator.config import DEFAULT_CONFIG, CoordinatorSettings, load, login_secrets, notify_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heald-coordinator",
        description="heald coordinator: fleet state, live dashboard, JSON API and fleet-wide safety.",
        epilog=EXIT_CODES_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"heald-coordinator {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"coordinator.toml (default {DEFAULT_CONFIG} when it exists)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the coordinator in the foreground (the default)")
    sub.add_parser("check", help="validate the config; exit 2 listing every problem")
    sub.add_parser(
        "pubkey",
        help="print the command-signing public key (base64) for agents' config; creates the key on first use",
    )
    sub.add_parser("password", help="print a new random dashboard password (the config line on stderr)")
    return parser


def _settings(args: argparse.Namespace) -> CoordinatorSettings:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return load(path)


async def _serve_until_signal(settings: CoordinatorSettings) -> None:
    from coordinator.service import serve  # noqa: PLC0415 - aiohttp/aiomqtt only when serving

    task = asyncio.create_task(serve(settings), name="coordinator")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _run(settings: CoordinatorSettings) -> int:
    from coordinator.broker import INSTALL_HINT, amqtt_available  # noqa: PLC0415

    replica = {"replica": settings.replica_id} if settings.replica_id else None
    configure_logging(settings.log.level, settings.log.format, bind=replica, cache_loggers=True)
    try:
        import aiohttp  # noqa: F401, PLC0415 - the web server; part of the coordinator extra
    except ImportError:
        sys.stderr.write("heald-coordinator: aiohttp is missing: pip install 'heald[coordinator]'\n")
        return 1
    if settings.embedded_broker and not amqtt_available():
        sys.stderr.write(f"heald-coordinator: no [mqtt] host configured and {INSTALL_HINT}\n")
        return 1
    asyncio.run(_serve_until_signal(settings))
    return 0


def _handle(args: argparse.Namespace) -> int:
    if args.command == "password":  # needs no config: it is how the first one gets its password
        password = secrets.token_urlsafe(24)
        out(password)
        sys.stderr.write(f'# coordinator.toml: [web] password = "{password}" (or alone in password_file)\n')
        return 0
    settings = _settings(args)
    if settings.web.enabled and args.command in ("check", "run", None):
        login_secrets(settings)  # the secret files are readable and strong enough (exit 2 otherwise)
    if args.command in ("check", "run", None):
        notify_tokens(settings.notify)  # the notify routes' token files are readable (exit 2 otherwise)
    if args.command == "check":
        mqtt = settings.mqtt.host or f"embedded {settings.mqtt.embedded_listen}"
        web = settings.web.listen if settings.web.enabled else "off"
        routes = ", ".join(f"{r.name} ({r.kind})" for r in settings.notify.routes) or "none"
        out(f"ok: store {settings.store_url.split('@')[-1]}, mqtt {mqtt}, web {web}, notify {routes}")
        return 0
    if args.command == "pubkey":
        from agent.wire.signing import key_id, load_or_create_private_key, public_key_text  # noqa: PLC0415

        key = load_or_create_private_key(settings.key_path)
        out(public_key_text(key.public_key()))
        sys.stderr.write(f"# key id {key_id(key.public_key())}, private key {settings.key_path}\n")
        return 0
    return _run(settings)


def main(argv: Sequence[str] | None = None) -> int:
    block_optional_imports()
    args = build_parser().parse_args(argv)
    return run_handler("heald-coordinator", lambda: _handle(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

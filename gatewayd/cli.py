"""The ``gatewayd`` command line. Subcommands are listed by ``gatewayd --help``.

This module is the only place that prints; everything below it logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from gatewayd import __version__
from gatewayd.proto.identity import claim_problems, identity_hex
from gatewayd.tools.commands import Handler, add_token_commands, add_top_commands


def _cmd_token_identity(args: argparse.Namespace) -> int:
    problems = claim_problems(args.issuer, args.subject)
    if args.json:
        doc = {
            "issuer": args.issuer,
            "subject": args.subject,
            "identity": identity_hex(args.issuer, args.subject),
            "problems": problems,
        }
        print(json.dumps(doc))
    else:
        print(identity_hex(args.issuer, args.subject))
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
    return 0


def _cmd_peer(args: argparse.Namespace) -> int:
    from gatewayd.peer import run_peer_cli  # the dev peer pulls in its own server stack

    return run_peer_cli(host=args.host, port=args.port, module_name=args.module)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gatewayd.demo import run_demo_cli

    return run_demo_cli(args.port)


def _cmd_run(args: argparse.Namespace) -> int:
    from functools import partial
    from pathlib import Path

    import trio

    from gatewayd.config import load_config
    from gatewayd.errors import ConfigError
    from gatewayd.main import build_gateway, run_command, serve_gateway, setup_logging

    try:
        config = load_config(args.config)
        gateway = build_gateway(config, base=Path(args.config).parent)
    except ConfigError as exc:
        print(f"gatewayd: invalid configuration {args.config}:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format)
    import os

    from gatewayd.reload import serve_reload_on_sighup
    from gatewayd.services.notify import SystemdNotifier, notify_settings_from_env

    notifier = SystemdNotifier(notify_settings_from_env(os.environ, os.getpid()))

    async def body(shutdown: trio.Event) -> None:
        async with trio.open_nursery() as nursery:  # SIGHUP -> reload (RELOADING=1 ... READY=1)
            # The broker re-reads its key ring on SIGHUP too (keys added by `gatewayd keys rotate`);
            # the API-key store is read per request, so new or revoked keys need no reload.
            broker = gateway.broker
            hooks = [lambda _new: broker.rescan()] if broker is not None else []
            reload = partial(
                serve_reload_on_sighup, gateway, Path(args.config), notifier=notifier, hooks=hooks
            )
            await nursery.start(reload)
            await serve_gateway(gateway, shutdown=shutdown, notifier=notifier)
            nursery.cancel_scope.cancel()

    failure = run_command(body)
    if failure is not None:
        print(f"gatewayd: {failure}", file=sys.stderr)
        return 1
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gatewayd.config import load_config
    from gatewayd.errors import ConfigError

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: invalid", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(config.streams)} streams, {len(config.reducers)} reducers, "
        f"{len(config.auth.issuers)} issuers; "
        f"upstream {config.upstream.url} database {config.upstream.database})"
    )
    return 0


def _tool(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run a diagnostics handler (gatewayd/tools/commands.py) and print its report."""

    def run(args: argparse.Namespace) -> int:
        report = handler(args)
        for line in report.out:
            print(line)
        for line in report.err:
            print(line, file=sys.stderr)
        return report.code

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Server-side realtime gateway for SpacetimeDB.",
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    token = sub.add_parser("token", help="token diagnostics")
    token_sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND")
    token_sub.required = True
    ident = token_sub.add_parser(
        "identity",
        help="print the SpacetimeDB identity for an issuer and subject",
        description="Print the 64-hex identity SpacetimeDB derives from a token's iss and sub "
        "(BLAKE3 of 'iss|sub'). iss and sub are used byte for byte: a trailing slash changes it.",
    )
    ident.add_argument("--issuer", required=True, help="the token's iss claim, exactly")
    ident.add_argument("--subject", required=True, help="the token's sub claim, exactly")
    ident.add_argument("--json", action="store_true", help="print JSON with any claim problems")
    ident.set_defaults(func=_cmd_token_identity)
    add_token_commands(token_sub, _tool)

    peer = sub.add_parser(
        "peer",
        help="run the dev peer (a SpacetimeDB-protocol server for tests and demos)",
        description="Serve the SpacetimeDB client protocol on HOST:PORT with a Python module "
        "(default: the demo module as database 'demo'). For tests, demos and CI only.",
    )
    peer.add_argument("--host", default="127.0.0.1")
    peer.add_argument("--port", type=int, default=3000, help="0 picks a free port")
    peer.add_argument("--module", default="demo", help="module to serve (default: demo)")
    peer.set_defaults(func=_cmd_peer)

    run = sub.add_parser("run", help="run the gateway daemon (what systemd starts)")
    run.add_argument("--config", required=True, help="the TOML config file")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="run everything embedded on 127.0.0.1: dev peer, gateway, demo page and a writer",
    )
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (0 picks a free one)")
    demo.set_defaults(func=_cmd_demo)

    check = sub.add_parser("check-config", help="validate a config file and explain every problem")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    from gatewayd.authcli import register_auth_commands  # keys, apikey

    register_auth_commands(sub)
    add_top_commands(sub, _tool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    assert isinstance(rc, int)
    return rc


if __name__ == "__main__":
    sys.exit(main())

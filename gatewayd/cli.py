"""The ``gatewayd`` command line. Subcommands are listed by ``gatewayd --help``.

This module is the only place that prints; everything below it logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from gatewayd import __version__
from gatewayd.proto.identity import claim_problems, identity_hex


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    assert isinstance(rc, int)
    return rc


if __name__ == "__main__":
    sys.exit(main())

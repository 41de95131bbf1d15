"""``gatewayd keys ...`` (the broker's key ring) and ``gatewayd apikey ...`` (API keys).

Both read the gatewayd config (``--config FILE``) for where the ring / the key database and the
pepper are. Output is plain text, or JSON with ``--json``. Secrets: private keys never leave
the ring folder; an API key is printed once, at creation (or rotation), and never again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gatewayd.errors import ConfigError


def _load(args: argparse.Namespace) -> tuple[Any, Path]:
    from gatewayd.config import load_config

    return load_config(args.config), Path(args.config).parent


def _out(args: argparse.Namespace, doc: Any, text: str) -> None:
    sys.stdout.write((json.dumps(doc, indent=2) if args.json else text) + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _broker(args: argparse.Namespace) -> Any:
    from gatewayd.services.broker import Broker, BrokerSettings, KeyRing

    config, base = _load(args)
    b = config.broker
    if b is None:
        raise ConfigError(f"{args.config}: no [broker] section")
    settings = BrokerSettings(
        issuer=b.issuer or None,
        audience=b.audience,
        algorithm=b.algorithm,
        token_lifetime_s=b.token_lifetime_s,
        service_token_lifetime_s=b.service_token_lifetime_s,
        service_subject=b.service_subject,
        publish_lead_s=b.publish_lead_s,
        retire_margin_s=b.retire_margin_s,
        rotate_after_s=b.rotate_after_s,
        rescan_s=b.rescan_s,
    )
    return Broker(settings, KeyRing(base / b.keys_dir))


def _keys_table(broker: Any) -> list[dict[str, Any]]:
    states = broker.key_states()
    return [
        {
            "kid": k.kid,
            "alg": k.alg,
            "state": states[k.kid].value,
            "created_at": _when(k.created_at),
            "signs_from": _when(k.activate_at),
        }
        for k in broker.keys()  # noqa: SIM118 (a method, not a dict)
    ]


def _cmd_keys(args: argparse.Namespace) -> int:
    broker = _broker(args)
    existing = broker.ring.load()
    if args.keys_command == "generate":
        if existing and not args.force:
            _err(
                f"gatewayd keys: {broker.ring.folder} already holds {len(existing)} keys; use "
                "`gatewayd keys rotate` (or --force to add a key that signs at once)"
            )
            return 1
        now = time.time()
        key = broker.ring.generate(broker.settings.algorithm, now=now, activate_at=now)
        broker.load()
        _out(
            args, {"kid": key.kid, "alg": key.alg}, f"generated {key.kid} ({key.alg}) in {broker.ring.folder}"
        )
        return 0
    broker.load()
    if args.keys_command == "rotate":
        key = broker.rotate()
        lead = broker.settings.publish_lead_s
        _out(
            args,
            {"kid": key.kid, "alg": key.alg, "signs_from": _when(key.activate_at)},
            f"published {key.kid} ({key.alg}); gatewayd signs with it from {_when(key.activate_at)} "
            f"({lead:.0f} s from now, after SpacetimeDB has refetched the JWKS)",
        )
        return 0
    rows = _keys_table(broker)
    text = "\n".join(
        f"{r['kid']}  {r['alg']}  {r['state']:<8}  created {r['created_at']}  signs from {r['signs_from']}"
        for r in rows
    )
    _out(args, rows, text)
    return 0


def _store(args: argparse.Namespace) -> Any:
    from gatewayd.wiring import api_key_store

    config, base = _load(args)
    return api_key_store(config, base)


def _parse_expiry(value: str | None) -> float | None:
    if value is None or value == "never":
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return time.time() + int(value[:-1]) * units[value[-1]]
    raise ConfigError(f"--expires: use e.g. 90d, 12h or never, not {value!r}")


def _cmd_apikey(args: argparse.Namespace) -> int:
    store = _store(args)
    now = time.time()
    if args.apikey_command == "create":
        subject = args.robot if args.robot.startswith("robot:") else f"robot:{args.robot}"
        try:
            key, rec = store.create(
                subject=subject,
                tenant_id=args.tenant,
                scopes=args.scope or [],
                expires_at=_parse_expiry(args.expires),
                env=args.env,
                label=args.label,
                key_id=args.key_id,
                grant_version=args.grant_version,
            )
        except ValueError as exc:
            _err(f"gatewayd apikey create: {exc}")
            return 1
        _out(
            args,
            {"key": key, **rec.as_json(now)},
            f"{key}\n(shown once: store it now; id {rec.key_id}, {rec.subject}, tenant {rec.tenant_id}, "
            f"scopes {' '.join(rec.scopes) or '-'}, expires {_when(rec.expires_at)})",
        )
        return 0
    if args.apikey_command == "list":
        rows = [r.as_json(now) for r in store.list()]
        text = "\n".join(
            f"{r['key_id']}  {r['status']:<8}  {r['subject']}  tenant={r['tenant_id']}  "
            f"scopes={' '.join(r['scopes']) or '-'}  expires={_when(r['expires_at'])}  "
            f"last_used={_when(r['last_used_at'])}"
            for r in rows
        )
        _out(args, rows, text or "(no API keys)")
        return 0
    try:
        if args.apikey_command == "revoke":
            store.revoke(args.key_id)
            _out(args, {"key_id": args.key_id, "status": "revoked"}, f"revoked {args.key_id}")
            return 0
        if args.apikey_command in ("disable", "enable"):
            store.set_enabled(args.key_id, args.apikey_command == "enable")
            _out(args, {"key_id": args.key_id}, f"{args.apikey_command}d {args.key_id}")
            return 0
        key, rec = store.rotate(args.key_id, grace_s=args.grace_s)
    except KeyError:
        _err(f"gatewayd apikey: no API key with id {args.key_id}")
        return 1
    except ValueError as exc:
        _err(f"gatewayd apikey: {exc}")
        return 1
    _out(
        args,
        {"key": key, **rec.as_json(now), "replaces": args.key_id},
        f"{key}\n(shown once; id {rec.key_id} replaces {args.key_id}, which stops working in "
        f"{args.grace_s:.0f} s)",
    )
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            rc: int = fn(args)
            return rc
        except ConfigError as exc:
            _err(f"gatewayd: {exc}")
            return 2

    return run


def register_auth_commands(sub: Any) -> None:
    """Add ``keys`` and ``apikey`` to the CLI's subcommands."""
    keys = sub.add_parser(
        "keys",
        help="the token broker's key ring (generate, list, rotate)",
        description="Manage the signing keys gatewayd mints SpacetimeDB tokens with "
        "(docs/auth.md, 'Key rotation').",
    )
    keys.add_argument("--config", required=True, help="the gatewayd TOML config ([broker] keys_dir)")
    keys.add_argument("--json", action="store_true")
    ks = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    ks.required = True
    gen = ks.add_parser("generate", help="create the first key of an empty ring (signs at once)")
    gen.add_argument("--force", action="store_true", help="add a key that signs at once to a non-empty ring")
    ks.add_parser("list", help="every key with its state: pending, signing, retiring")
    ks.add_parser("rotate", help="publish the next key; it signs after publish_lead_s")
    keys.set_defaults(func=_guard(_cmd_keys))

    ak = sub.add_parser(
        "apikey",
        help="API keys for robots and integrations (create, list, revoke, rotate)",
        description="Manage gatewayd API keys (docs/api-keys.md). A key is printed once.",
    )
    ak.add_argument("--config", required=True, help="the gatewayd TOML config ([auth.api_keys])")
    ak.add_argument("--json", action="store_true")
    aks = ak.add_subparsers(dest="apikey_command", metavar="SUBCOMMAND")
    aks.required = True
    create = aks.add_parser("create", help="create a key for a robot (printed once)")
    create.add_argument("--robot", required=True, help="the owner: robot:<id> (or just <id>)")
    create.add_argument("--tenant", help="the tenant the key acts in")
    create.add_argument("--scope", action="append", help="a scope (repeat); fixed at creation")
    create.add_argument("--expires", default="90d", help="lifetime: 90d, 12h, 30m, or never (default 90d)")
    create.add_argument("--env", choices=["live", "test"], default="live", help="gw_live_ or gw_test_ prefix")
    create.add_argument("--label", default="", help="a note for people")
    create.add_argument("--key-id", help="the public key id (default: random)")
    create.add_argument("--grant-version", type=int, default=1, help="the module's grant version claim")
    aks.add_parser("list", help="every key (never the secret)")
    for name, helptext in (
        ("revoke", "revoke a key for good"),
        ("disable", "disable a key"),
        ("enable", "enable a disabled key"),
    ):
        p = aks.add_parser(name, help=helptext)
        p.add_argument("key_id")
    rot = aks.add_parser("rotate", help="issue a replacement key; the old one expires after --grace-s")
    rot.add_argument("key_id")
    rot.add_argument("--grace-s", type=float, default=0.0, help="seconds the old key keeps working")
    ak.set_defaults(func=_guard(_cmd_apikey))

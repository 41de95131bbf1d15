"""Argument parsing and handlers for the diagnostics commands (``token decode|verify|mint|keygen``,
``identity plan-migration``, ``smoke``).

Handlers return a :class:`Report` (exit code, stdout lines, stderr lines); ``gatewayd/cli.py``
prints it, so this module never prints. Exit codes: 0 success, 1 a failed check (or a refused
action), 2 a usage or input error (unreadable file, bad flag value).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from gatewayd.tools import migration
from gatewayd.tools import tokens as tt

MAX_JWKS_BYTES: Final = 1024 * 1024


@dataclass(slots=True)
class Report:
    code: int = 0
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)


Handler = Callable[[argparse.Namespace], Report]
Runner = Callable[[Handler], Callable[[argparse.Namespace], int]]


def _token_arg(value: str) -> str:
    """``-`` reads the token from stdin (keeps it out of shell history and ``ps``)."""
    if value == "-":
        import sys

        return sys.stdin.read().strip()
    return value.strip()


# --- token decode --------------------------------------------------------------------------------


def cmd_token_decode(args: argparse.Namespace) -> Report:
    token = _token_arg(args.token)
    doc = tt.describe(token)
    rep = Report()
    if args.json:
        rep.out.append(json.dumps(doc, indent=2, sort_keys=True))
        rep.code = 0 if doc["jws"] and not doc["problems"] else 1
        return rep
    if not doc["jws"]:
        rep.out.append(f"not a JWT: {doc['kind']}" if doc["kind"] else "not a JWT")
        rep.out += [f"problem: {p}" for p in doc["problems"]]
        rep.code = 1
        return rep
    rep.out.append("header:")
    rep.out += ["  " + line for line in json.dumps(doc["header"], indent=2, sort_keys=True).splitlines()]
    rep.out.append("claims:")
    rep.out += ["  " + line for line in json.dumps(doc["claims"], indent=2, sort_keys=True).splitlines()]
    rep.out += [f"note: {n}" for n in doc["notes"]]
    rep.out += [f"problem: {p}" for p in doc["problems"]]
    rep.out.append("(decoded only: the signature was not checked; use `gatewayd token verify`)")
    rep.code = 1 if doc["problems"] else 0
    return rep


# --- token verify --------------------------------------------------------------------------------


def load_jwks_source(source: str) -> dict[str, Any]:
    """A JWKS from an https/http URL (no redirects, size-capped) or a file. Raises ValueError."""
    if source.startswith(("https://", "http://")):
        try:
            with httpx.stream("GET", source, timeout=10.0, follow_redirects=False) as resp:
                if resp.status_code != 200:
                    raise ValueError(f"{source}: HTTP {resp.status_code}")
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"{source}: more than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise ValueError(f"{source}: {type(exc).__name__}: {exc}") from None
        raw = bytes(body)
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise ValueError(f"{source}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{source}: a JWKS is an object with a 'keys' list")
    return doc


def cmd_token_verify(args: argparse.Namespace) -> Report:
    rep = Report()
    jwks = None
    if args.jwks:
        try:
            jwks = load_jwks_source(args.jwks)
        except ValueError as exc:
            return Report(2, err=[f"gatewayd token verify: cannot load the JWKS: {exc}"])
    stdb = {"auto": None, "yes": True, "no": False}[args.spacetimedb]
    report = tt.verify_token(
        _token_arg(args.token),
        jwks=jwks,
        issuer=args.issuer,
        audience=args.audience,
        spacetimedb=stdb,
        leeway_s=args.leeway_s,
        max_lifetime_s=args.max_lifetime_s,
    )
    for c in report.checks:
        mark = {"ok": "ok  ", "fail": "FAIL", "skip": "skip"}[c.status]
        rep.out.append(f"{mark} {c.name}: {c.detail}")
    if report.identity:
        rep.out.append(f"identity: {report.identity}")
    failed = report.failed
    if failed:
        names = ", ".join(dict.fromkeys(c.name for c in failed))
        kind = f" ({report.kind})" if report.kind else ""
        rep.out.append(f"verdict: INVALID{kind}: {len(failed)} failed checks: {names}")
        rep.code = 1
    elif not report.signature_checked:
        rep.out.append(
            "verdict: INCOMPLETE: no check failed, but the signature was not checked (give --jwks)"
        )
        rep.code = 2
    else:
        skipped = [c.name for c in report.checks if c.status == "skip"]
        rep.out.append("verdict: VALID" + (f" (not checked: {', '.join(skipped)})" if skipped else ""))
    return rep


# --- token keygen / mint ----------------------------------------------------------------------


def cmd_token_keygen(args: argparse.Namespace) -> Report:
    path = Path(args.key)
    if path.exists():
        return Report(2, err=[f"gatewayd token keygen: {path} exists; not overwriting a key"])
    key = tt.generate_key(args.alg)
    tt.write_private_key(key, path)
    jwks = {"keys": [tt.public_jwk(key, args.kid)]}
    text = json.dumps(jwks, indent=2)
    if args.jwks_out:
        Path(args.jwks_out).write_text(text + "\n")
    return Report(
        0, out=[text], err=[f"wrote the private key to {path} (mode 0600); the public JWKS follows"]
    )


def cmd_token_mint(args: argparse.Namespace) -> Report:
    try:
        key = tt.load_private_key(Path(args.key))
    except (OSError, ValueError) as exc:
        return Report(2, err=[f"gatewayd token mint: cannot load the key: {exc}"])
    extra: dict[str, Any] = {}
    try:
        for c in args.claim or []:
            k, v = tt.parse_claim(c)
            extra[k] = v
    except ValueError as exc:
        return Report(2, err=[f"gatewayd token mint: {exc}"])
    if args.tenant is not None:
        extra["tenant_id"] = args.tenant
    if args.scope is not None:
        extra["scope"] = args.scope
    try:
        token = tt.mint_token(
            key,
            issuer=args.issuer,
            subject=args.subject,
            audience=args.audience,
            lifetime_s=args.lifetime_s,
            extra=extra,
            kid=args.kid,
        )
    except tt.MintRefused as exc:
        return Report(1, err=[f"gatewayd token mint: {exc}"])
    return Report(0, out=[token])


# --- identity plan-migration ----------------------------------------------------------------------


def cmd_plan_migration(args: argparse.Namespace) -> Report:
    try:
        pairs = migration.read_subjects(Path(args.subjects).read_text())
    except (OSError, ValueError) as exc:
        return Report(2, err=[f"gatewayd identity plan-migration: {args.subjects}: {exc}"])
    plan = migration.plan_migration(args.from_issuer, args.to_issuer, pairs)
    rep = Report()
    if args.json:
        rep.out.append(json.dumps(migration.plan_json(plan), indent=2))
    else:
        rep.out += migration.plan_lines(plan)
    if plan.blocked:
        rep.code = 1
    if not args.apply:
        if plan.to_link:
            rep.err.append(
                "dry run: nothing written (add --apply with --database-url, --database and a token)"
            )
        return rep
    if plan.blocked:
        rep.err.append("not applying: resolve the blocked subjects first")
        return rep
    token = args.token or (os.environ.get(args.token_env) if args.token_env else None)
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not (args.database_url and args.database and token):
        return Report(
            2, rep.out, ["--apply needs --database-url, --database and --token-file/--token-env/--token"]
        )
    outcomes = migration.apply_links(
        plan, database_url=args.database_url, database=args.database, token=token, reducer=args.reducer
    )
    for o in outcomes:
        rep.out.append(f"{'linked' if o.ok else 'FAILED'} {o.subject}: {o.message}")
    failed = [o for o in outcomes if not o.ok]
    rep.out.append(f"applied: {len(outcomes) - len(failed)} linked, {len(failed)} failed")
    rep.code = 1 if failed else 0
    return rep


# --- smoke ---------------------------------------------------------------------------------------


def cmd_smoke(args: argparse.Namespace) -> Report:
    from gatewayd.tools.smoke import SmokeSettings, run_smoke_sync

    try:
        call_args = json.loads(args.args)
    except ValueError as exc:
        return Report(2, err=[f"gatewayd smoke: --args is not JSON: {exc}"])
    token = args.token
    if token is None and args.token_env:
        token = os.environ.get(args.token_env)
    if token is None and args.token_url:
        token = ""  # fetched by the smoke run itself
    if token is None:
        return Report(2, err=["gatewayd smoke: give --token, --token-env or --token-url"])
    settings = SmokeSettings(
        gateway=args.gateway,
        token=token,
        token_url=args.token_url,
        stream=args.stream,
        reducer=args.reducer,
        args=call_args,
        expect_event=args.expect_event,
        tenant=args.tenant,
        bound_s=args.bound_s,
    )
    t0 = time.monotonic()
    verdict = run_smoke_sync(settings)
    rep = Report(0 if verdict.ok else 1)
    rep.err += verdict.steps
    rep.out.append(verdict.line(time.monotonic() - t0))
    return rep


# --- parsers -------------------------------------------------------------------------------------


def add_token_commands(token_sub: Any, run: Runner) -> None:
    """``token decode|verify|keygen|mint`` under the existing ``token`` command."""
    dec = token_sub.add_parser(
        "decode",
        help="show a token's header and claims (no verification); names opaque credentials",
        description="Decode a JWT without verifying it: header, claims, times, the SpacetimeDB identity "
        "of (iss, sub), duplicate JSON members and dangerous header members. Non-JWT credentials "
        "(gatewayd API keys, Better Auth session tokens, OAuth opaque tokens) are named. Exit 0 when "
        "it decodes without problems, 1 otherwise.",
    )
    dec.add_argument("token", help="the token ('-' reads it from stdin)")
    dec.add_argument("--json", action="store_true")
    dec.set_defaults(func=run(cmd_token_decode))

    ver = token_sub.add_parser(
        "verify",
        help="run every check on a token and name each one that fails",
        description="Verify a JWT against a JWKS (URL or file), an issuer and an audience, running "
        "every check of SECURITY.md and naming each failure. For a SpacetimeDB audience also "
        "SpacetimeDB's limits (ES256/RS256, iat, iss/sub <= 128 bytes without '|', kid in the JWKS). "
        "Exit 0 valid, 1 invalid, 2 incomplete (signature not checked) or bad input.",
    )
    ver.add_argument("token", help="the token ('-' reads it from stdin)")
    ver.add_argument("--jwks", help="JWKS URL (https://...) or file")
    ver.add_argument("--issuer", help="the expected iss, exactly")
    ver.add_argument("--audience", help="the audience that must be in aud")
    ver.add_argument(
        "--spacetimedb",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also check SpacetimeDB's rules (auto: when the audience names spacetimedb)",
    )
    ver.add_argument("--leeway-s", type=int, default=tt.DEFAULT_LEEWAY_S)
    ver.add_argument("--max-lifetime-s", type=int, default=None, help="largest exp - iat accepted")
    ver.set_defaults(func=run(cmd_token_verify))

    kg = token_sub.add_parser(
        "keygen",
        help="create a local signing key (PEM, mode 0600) and print its public JWKS",
    )
    kg.add_argument("--key", required=True, help="where to write the private key (must not exist)")
    kg.add_argument("--alg", choices=("ES256", "RS256", "EdDSA"), default="ES256")
    kg.add_argument("--kid", help="key id (default: the RFC 7638 thumbprint)")
    kg.add_argument("--jwks-out", help="also write the public JWKS to this file")
    kg.set_defaults(func=run(cmd_token_keygen))

    mint = token_sub.add_parser(
        "mint",
        help="mint a local test token (refuses production-looking issuers)",
        description="Sign a short-lived test token with a local key file. Refuses https issuers on "
        "non-loopback hosts, and claims SpacetimeDB would refuse (iss/sub empty, > 128 bytes, '|').",
    )
    mint.add_argument("--key", required=True, help="PEM private key (see `gatewayd token keygen`)")
    mint.add_argument("--issuer", required=True)
    mint.add_argument("--subject", required=True)
    mint.add_argument("--audience")
    mint.add_argument("--tenant", help="tenant_id claim")
    mint.add_argument("--scope", help="scope claim (space-separated)")
    mint.add_argument(
        "--claim", action="append", help="extra claim key=value (value parsed as JSON if it can be)"
    )
    mint.add_argument("--lifetime-s", type=int, default=3600)
    mint.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    mint.set_defaults(func=run(cmd_token_mint))


def add_top_commands(sub: Any, run: Runner) -> None:
    """``identity plan-migration`` and ``smoke``."""
    ident = sub.add_parser("identity", help="identity tools (issuer migrations)")
    ident_sub = ident.add_subparsers(dest="identity_command", metavar="SUBCOMMAND")
    ident_sub.required = True
    pm = ident_sub.add_parser(
        "plan-migration",
        help="old and new identity per subject, collisions and links needed when changing issuer",
        description="Dry run by default. SUBJECTS: one subject per line, or 'SUBJECT NEW_SUBJECT'. "
        "--apply writes the links through the module's identity-link reducer. Exit 1 when a subject "
        "is blocked (collision or invalid claims) or a link failed.",
    )
    pm.add_argument("--from-issuer", required=True)
    pm.add_argument("--to-issuer", required=True)
    pm.add_argument("--subjects", required=True, help="file of subjects")
    pm.add_argument("--json", action="store_true")
    pm.add_argument("--apply", action="store_true", help="write the links (default: dry run)")
    pm.add_argument("--database-url", help="SpacetimeDB base URL, e.g. http://127.0.0.1:3000")
    pm.add_argument("--database", help="database name")
    pm.add_argument("--token-file", help="file holding the service token")
    pm.add_argument("--token-env", help="environment variable holding the service token")
    pm.add_argument("--token", help=argparse.SUPPRESS)
    pm.add_argument("--reducer", default=migration.LINK_REDUCER, help="the identity-link reducer")
    pm.set_defaults(func=run(cmd_plan_migration))

    smoke = sub.add_parser(
        "smoke",
        help="end-to-end check of a running gateway: ready, stream, write, envelope, resume",
        description="Checks /readyz, opens a stream, calls a reducer, waits for the expected envelope "
        "(event, id, tenant_id, schema_version, payload) within --bound-s, resumes from the last id, "
        "and prints a one-line verdict. Exit 0 pass, 1 fail, 2 bad arguments. '{nonce}' in --args "
        "is replaced by a unique string, which the envelope's payload must contain.",
    )
    smoke.add_argument("--gateway", required=True, help="the gateway's base URL")
    smoke.add_argument("--token", help="bearer token")
    smoke.add_argument("--token-env", help="environment variable holding the bearer token")
    smoke.add_argument("--token-url", help="GET this URL for {'token': ...} or a demo login map")
    smoke.add_argument("--stream", default="documents")
    smoke.add_argument("--reducer", default="create_document")
    smoke.add_argument(
        "--args", default='{"title": "smoke {nonce}", "body": "gatewayd smoke test"}', help="JSON arguments"
    )
    smoke.add_argument("--expect-event", default="document.inserted")
    smoke.add_argument("--tenant", help="tenant_id query parameter (default: the token's)")
    smoke.add_argument("--bound-s", type=float, default=10.0, help="deadline for each step")
    smoke.set_defaults(func=run(cmd_smoke))

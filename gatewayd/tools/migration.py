"""``gatewayd identity plan-migration``: what changes when actors move to another issuer.

SpacetimeDB derives an identity from ``(iss, sub)`` exactly (PROTOCOL.md §6.1): a new issuer, a
trailing slash, or a new subject scheme gives every actor a *new* identity, and any table keyed by
identity (``ctx.sender``) forgets them unless the new identity is linked to the same actor first.

The plan lists, per subject, the old and the new identity, and flags:

* claim problems SpacetimeDB would refuse or mis-derive (empty, > 128 bytes, ``|``);
* collisions: two subjects that get the same new identity, or a new identity that is some other
  subject's old one (it would inherit that actor's rows);
* duplicate subjects in the input.

Every remaining subject whose identity changes must be *linked*. ``--apply`` writes those links
through the module's identity-link reducer (the demo module's service-only
``migrate_identity_link(from_identity, to_identity, issuer)``) over SpacetimeDB's HTTP API with the
service token, one call per subject, and reports each outcome.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from gatewayd.proto.identity import claim_problems, identity_hex

LINK_REDUCER: Final = "migrate_identity_link"


@dataclass(slots=True)
class PlanRow:
    subject: str
    new_subject: str
    old_identity: str
    new_identity: str
    problems: list[str] = field(default_factory=list)

    @property
    def action(self) -> Literal["link", "unchanged", "blocked"]:
        if self.problems:
            return "blocked"
        return "unchanged" if self.old_identity == self.new_identity else "link"


@dataclass(slots=True)
class Plan:
    from_issuer: str
    to_issuer: str
    rows: list[PlanRow]
    issuer_problems: list[str]

    @property
    def to_link(self) -> list[PlanRow]:
        return [r for r in self.rows if r.action == "link"]

    @property
    def blocked(self) -> list[PlanRow]:
        return [r for r in self.rows if r.action == "blocked"]


def read_subjects(text: str) -> list[tuple[str, str]]:
    """One subject per line, optionally followed by whitespace and its new subject (when the
    subject scheme changes too). Blank lines and ``#`` comments are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"line {line!r}: expected 'SUBJECT' or 'SUBJECT NEW_SUBJECT'")
        out.append((parts[0], parts[-1]))
    return out


def plan_migration(from_issuer: str, to_issuer: str, subjects: Iterable[tuple[str, str]]) -> Plan:
    rows: list[PlanRow] = []
    seen: set[str] = set()
    for sub, new_sub in subjects:
        row = PlanRow(sub, new_sub, identity_hex(from_issuer, sub), identity_hex(to_issuer, new_sub))
        row.problems += [
            f"old claims: {p}" for p in claim_problems(from_issuer, sub) if not p.startswith("iss")
        ]
        row.problems += [
            f"new claims: {p}" for p in claim_problems(to_issuer, new_sub) if not p.startswith("iss")
        ]
        if sub in seen:
            row.problems.append("duplicate subject in the input")
        seen.add(sub)
        rows.append(row)
    by_new: dict[str, list[PlanRow]] = defaultdict(list)
    by_old = {r.old_identity: r for r in rows}
    for r in rows:
        by_new[r.new_identity].append(r)
    for ident, group in by_new.items():
        if len({r.subject for r in group}) > 1:
            names = ", ".join(sorted({r.subject for r in group}))
            for r in group:
                r.problems.append(f"collision: {names} all get identity {ident}")
        owner = by_old.get(ident)
        if owner is not None:
            for r in group:
                if r.subject != owner.subject:
                    r.problems.append(f"collision: the new identity is {owner.subject}'s current identity")
    issuer_problems = [f"--from-issuer: {p}" for p in claim_problems(from_issuer, "x") if p.startswith("iss")]
    issuer_problems += [f"--to-issuer: {p}" for p in claim_problems(to_issuer, "x") if p.startswith("iss")]
    if from_issuer.rstrip("/") == to_issuer.rstrip("/") and from_issuer != to_issuer:
        issuer_problems.append(
            "the issuers differ only by a trailing slash: every identity changes (is that intended?)"
        )
    return Plan(from_issuer, to_issuer, rows, issuer_problems)


def plan_lines(plan: Plan) -> list[str]:
    out = [f"from issuer {plan.from_issuer!r} to issuer {plan.to_issuer!r}: {len(plan.rows)} subjects"]
    out += [f"warning: {p}" for p in plan.issuer_problems]
    for r in plan.rows:
        arrow = r.subject if r.subject == r.new_subject else f"{r.subject} -> {r.new_subject}"
        out.append(f"{r.action:9} {arrow}")
        out.append(f"          old {r.old_identity}")
        out.append(f"          new {r.new_identity}")
        out += [f"          problem: {p}" for p in r.problems]
    out.append(
        f"summary: {len(plan.to_link)} to link, {len(plan.blocked)} blocked, "
        f"{len(plan.rows) - len(plan.to_link) - len(plan.blocked)} unchanged"
    )
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "from_issuer": plan.from_issuer,
        "to_issuer": plan.to_issuer,
        "issuer_problems": plan.issuer_problems,
        "subjects": [
            {
                "subject": r.subject,
                "new_subject": r.new_subject,
                "old_identity": r.old_identity,
                "new_identity": r.new_identity,
                "action": r.action,
                "problems": r.problems,
            }
            for r in plan.rows
        ],
    }


@dataclass(frozen=True, slots=True)
class LinkOutcome:
    subject: str
    ok: bool
    message: str


def apply_links(
    plan: Plan,
    *,
    database_url: str,
    database: str,
    token: str,
    reducer: str = LINK_REDUCER,
    timeout_s: float = 10.0,
    transport: httpx.BaseTransport | None = None,
) -> list[LinkOutcome]:
    """Call ``reducer(from_identity, to_identity, issuer)`` once per subject to link. Sync."""
    base = database_url.rstrip("/")
    url = f"{base}/v1/database/{database}/call/{reducer}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    out = []
    with httpx.Client(timeout=timeout_s, follow_redirects=False, transport=transport) as client:
        for r in plan.to_link:
            args = {
                "from_identity": {"__identity__": "0x" + r.old_identity},
                "to_identity": {"__identity__": "0x" + r.new_identity},
                "issuer": plan.to_issuer,
            }
            try:
                resp = client.post(url, json=args, headers=headers)
            except httpx.HTTPError as exc:
                out.append(LinkOutcome(r.subject, False, f"{type(exc).__name__}: {exc}"))
                continue
            if resp.status_code == 200:
                out.append(LinkOutcome(r.subject, True, "linked"))
            else:
                out.append(LinkOutcome(r.subject, False, f"HTTP {resp.status_code}: {resp.text[:300]}"))
    return out

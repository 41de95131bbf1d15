"""The demo module: a multi-tenant document app, served as database ``demo``.

It is what ``gatewayd demo`` and the tests run against, so it behaves like a careful real module:
every reducer derives the caller's rights from the tables, never from arguments or claims alone.

Actors and identities
---------------------
An *actor* is a person (``user:<id>``) or a robot (``robot:<id>``), as in gatewayd's subject scheme.
A SpacetimeDB identity is tied to an actor by ``actor_identity_link``. ``client_connected`` makes
that link itself when a token from a trusted issuer has ``sub`` equal to a known actor id (and
checks ``aud`` when an audience is configured, because SpacetimeDB does not); anonymous
identities may connect and read but own no actor. Links can also be seeded
(:attr:`DemoConfig.identity_links`).

Rights
------
* A user's rights in a tenant come from ``membership.role`` -> ``role_permission``.
* A robot's rights come from an enabled ``api_key_grant`` for the tenant whose ``scopes`` list
  the permission. A robot calling natively must present ``api_key_id`` and ``grant_version``
  claims matching the grant: bumping the version (``set_api_key_grant``/``revoke_api_key``)
  invalidates still-unexpired tokens.
* A user token carrying ``tenant_id`` and ``membership_version`` claims is refused for that
  tenant once the membership's ``version`` moved on.
* Membership and grant management are human-only.

Delegated calls
---------------
``create_document_as``/``update_document_as``/``delete_document_as`` take the acting ``actor_id``
(and optionally ``on_behalf_of``, a user who gave the actor an ``impersonation_grant``) as
arguments. They are accepted only from identities in the private ``service_account`` table
(seeded from :attr:`DemoConfig.service_identities`: gatewayd's service identity). The audit row
records both the calling identity and the actor (and the user acted for).

Seed data (``DemoConfig.seed``): tenants ``acme`` and ``globex``; users ``user:alice`` (acme
owner), ``user:bob`` (acme editor, globex viewer, has delegated to ``robot:importer`` in acme),
``user:carol`` (globex owner); robot ``robot:importer`` with API key grant ``ak-1`` on acme
(``document.create``, ``document.update``, version 1); three documents; a ``gateway`` canary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gatewayd.peer.module import Module, ReducerContext, ReducerError
from gatewayd.peer.store import Row
from gatewayd.proto.sats import BOOL, IDENTITY, STRING, TIMESTAMP, U64, ArrayT, option

PERMISSIONS: Final = (
    "document.read",
    "document.create",
    "document.update",
    "document.delete",
    "membership.manage",
    "grant.manage",
    "canary.write",
)
ROLES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "owner": ("Everything in the tenant", PERMISSIONS),
    "admin": ("Manages members, grants and documents", PERMISSIONS),
    "editor": (
        "Reads and writes documents",
        ("document.read", "document.create", "document.update", "document.delete"),
    ),
    "viewer": ("Reads documents", ("document.read",)),
}
MAX_TITLE_CHARS: Final = 200
MAX_BODY_BYTES: Final = 64 * 1024
ACTOR_KINDS: Final = ("user", "robot")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Settings of the demo module.

    Attributes:
        service_identities: identities (64 hex) allowed to call the delegated reducers and the
            canary (gatewayd's service connection).
        trusted_issuers: issuers whose ``sub`` is linked to actors at connect time; None trusts
            every issuer except the peer's own anonymous one (``local_issuer``).
        audience: when set, every non-anonymous token must list it in ``aud``, or
            ``client_connected`` rejects the connection.
        identity_links: identity (64 hex) -> actor id, seeded at init.
        seed: create the demo tenants, actors, grants and documents.
        local_issuer: the peer's anonymous issuer (never linked to an actor).
    """

    service_identities: frozenset[str] = frozenset()
    trusted_issuers: frozenset[str] | None = None
    audience: str | None = None
    identity_links: Mapping[str, str] = field(default_factory=dict)
    seed: bool = True
    local_issuer: str = "localhost"


def make_demo_module(config: DemoConfig | None = None, *, name: str = "demo") -> Module:
    """Build the demo module (a fresh definition each time)."""
    cfg = config or DemoConfig()
    mod = Module(name)

    mod.table("tenant", {"id": STRING, "name": STRING, "created_at": TIMESTAMP}, primary_key="id")
    mod.table(
        "actor",
        {"id": STRING, "kind": STRING, "display_name": STRING, "disabled": BOOL},
        primary_key="id",
    )
    mod.table(
        "actor_identity_link",
        {"identity": IDENTITY, "actor_id": STRING, "issuer": STRING, "linked_at": TIMESTAMP},
        primary_key="identity",
        indexes=("actor_id",),
    )
    mod.table(
        "membership",
        {
            "id": U64,
            "tenant_id": STRING,
            "actor_id": STRING,
            "role": STRING,
            "version": U64,
            "updated_at": TIMESTAMP,
        },
        primary_key="id",
        auto_inc=("id",),
        unique=[("tenant_id", "actor_id")],
        indexes=("tenant_id", "actor_id"),
    )
    mod.table("role", {"name": STRING, "description": STRING}, primary_key="name")
    mod.table(
        "role_permission",
        {"id": U64, "role": STRING, "permission": STRING},
        primary_key="id",
        auto_inc=("id",),
        unique=[("role", "permission")],
        indexes=("role",),
    )
    mod.table(
        "document",
        {
            "id": U64,
            "tenant_id": STRING,
            "title": STRING,
            "body": STRING,
            "updated_at": TIMESTAMP,
            "updated_by": IDENTITY,
        },
        primary_key="id",
        auto_inc=("id",),
        indexes=("tenant_id",),
    )
    mod.table(
        "audit_event",
        {
            "id": U64,
            "tenant_id": STRING,
            "at": TIMESTAMP,
            "action": STRING,
            "actor_id": STRING,
            "on_behalf_of": option(STRING),
            "caller": IDENTITY,
            "target": STRING,
            "detail": STRING,
        },
        primary_key="id",
        auto_inc=("id",),
        indexes=("tenant_id",),
        public=False,
    )
    mod.table(
        "api_key_grant",
        {
            "key_id": STRING,
            "tenant_id": STRING,
            "robot_actor_id": STRING,
            "scopes": ArrayT(STRING),
            "version": U64,
            "enabled": BOOL,
            "updated_at": TIMESTAMP,
        },
        primary_key="key_id",
        indexes=("tenant_id", "robot_actor_id"),
        public=False,
    )
    mod.table(
        "impersonation_grant",
        {
            "id": U64,
            "tenant_id": STRING,
            "grantor_actor_id": STRING,
            "grantee_actor_id": STRING,
            "created_at": TIMESTAMP,
            "revoked": BOOL,
        },
        primary_key="id",
        auto_inc=("id",),
        indexes=("tenant_id", "grantee_actor_id"),
    )
    mod.table(
        "canary",
        {"name": STRING, "counter": U64, "updated_at": TIMESTAMP, "updated_by": IDENTITY},
        primary_key="name",
    )
    mod.table(
        "service_account",
        {"identity": IDENTITY, "label": STRING, "created_at": TIMESTAMP},
        primary_key="identity",
        public=False,
    )

    # --- helpers (closures over cfg) -----------------------------------------------------------

    def trusted(issuer: str | None) -> bool:
        if issuer is None or issuer == cfg.local_issuer:
            return False
        return cfg.trusted_issuers is None or issuer in cfg.trusted_issuers

    def actor_of(ctx: ReducerContext) -> Row:
        """The calling actor, from the identity link (or the token's subject if trusted)."""
        link = ctx.db.actor_identity_link.find(ctx.sender)
        actor_id = link["actor_id"] if link else (ctx.subject if trusted(ctx.issuer) else None)
        actor = ctx.db.actor.find(actor_id) if actor_id else None
        if actor is None:
            raise ReducerError(f"identity {ctx.sender} is not linked to any actor")
        if actor["disabled"]:
            raise ReducerError(f"actor {actor['id']} is disabled")
        return actor

    def tenant(ctx: ReducerContext, tenant_id: str) -> Row:
        t = ctx.db.tenant.find(tenant_id)
        if t is None:
            raise ReducerError(f"no such tenant: {tenant_id}")
        return t

    def membership(ctx: ReducerContext, tenant_id: str, actor_id: str) -> Row | None:
        rows = ctx.db.membership.filter(tenant_id=tenant_id, actor_id=actor_id)
        return rows[0] if rows else None

    def role_allows(ctx: ReducerContext, role: str, permission: str) -> bool:
        return bool(ctx.db.role_permission.filter(role=role, permission=permission))

    def check_claims_fresh(ctx: ReducerContext, actor: Row, tenant_id: str) -> None:
        """Refuse tokens whose grant/membership version claims are stale (native calls)."""
        claims = ctx.claims or {}
        if actor["kind"] == "robot":
            key_id, version = claims.get("api_key_id"), claims.get("grant_version")
            if not isinstance(key_id, str) or not isinstance(version, int):
                raise ReducerError("robot tokens must carry api_key_id and grant_version claims")
            grant = ctx.db.api_key_grant.find(key_id)
            if grant is None or grant["robot_actor_id"] != actor["id"]:
                raise ReducerError(f"api key {key_id} does not belong to {actor['id']}")
            if grant["version"] != version:
                raise ReducerError(
                    f"api key grant {key_id} changed (version {version} is stale, now {grant['version']})"
                )
        elif claims.get("tenant_id") == tenant_id and isinstance(claims.get("membership_version"), int):
            m = membership(ctx, tenant_id, actor["id"])
            if m is None or m["version"] != claims["membership_version"]:
                raise ReducerError(f"membership of {actor['id']} in {tenant_id} changed; token is stale")

    def allowed(ctx: ReducerContext, actor: Row, tenant_id: str, permission: str) -> bool:
        if actor["kind"] == "user":
            m = membership(ctx, tenant_id, actor["id"])
            return m is not None and role_allows(ctx, m["role"], permission)
        for grant in ctx.db.api_key_grant.filter(robot_actor_id=actor["id"]):
            if grant["tenant_id"] == tenant_id and grant["enabled"] and permission in grant["scopes"]:
                return True
        return False

    def require(ctx: ReducerContext, actor: Row, tenant_id: str, permission: str) -> None:
        tenant(ctx, tenant_id)
        if not allowed(ctx, actor, tenant_id, permission):
            raise ReducerError(f"{actor['id']} may not {permission} in tenant {tenant_id}")

    def require_human(actor: Row) -> None:
        if actor["kind"] != "user":
            raise ReducerError(f"{actor['id']} is not a person; this action is human-only")

    def audit(
        ctx: ReducerContext,
        tenant_id: str,
        action: str,
        actor_id: str,
        target: str,
        detail: str = "",
        on_behalf_of: str | None = None,
    ) -> None:
        ctx.db.audit_event.insert(
            {
                "id": 0,
                "tenant_id": tenant_id,
                "at": ctx.timestamp,
                "action": action,
                "actor_id": actor_id,
                "on_behalf_of": on_behalf_of,
                "caller": ctx.sender,
                "target": target,
                "detail": detail,
            }
        )

    def check_document(title: str, body: str) -> None:
        if not title.strip():
            raise ReducerError("title must not be empty")
        if len(title) > MAX_TITLE_CHARS:
            raise ReducerError(f"title is longer than {MAX_TITLE_CHARS} characters")
        if len(body.encode()) > MAX_BODY_BYTES:
            raise ReducerError(f"body is larger than {MAX_BODY_BYTES} bytes")

    def document(ctx: ReducerContext, doc_id: int) -> Row:
        doc = ctx.db.document.find(doc_id)
        if doc is None:
            raise ReducerError(f"no such document: {doc_id}")
        return doc

    # --- document operations, shared by the native and delegated reducers -------------------

    def do_create(
        ctx: ReducerContext, actor: Row, tenant_id: str, title: str, body: str, via: str | None
    ) -> None:
        check_document(title, body)
        doc = ctx.db.document.insert(
            {
                "id": 0,
                "tenant_id": tenant_id,
                "title": title,
                "body": body,
                "updated_at": ctx.timestamp,
                "updated_by": ctx.sender,
            }
        )
        audit(ctx, tenant_id, "document.create", actor["id"], f"document:{doc['id']}", title, via)

    def do_update(ctx: ReducerContext, actor: Row, doc: Row, title: str, body: str, via: str | None) -> None:
        check_document(title, body)
        if doc["title"] == title and doc["body"] == body:
            return  # nothing changes: no row is written, so no one gets an update
        ctx.db.document.update(
            {**doc, "title": title, "body": body, "updated_at": ctx.timestamp, "updated_by": ctx.sender}
        )
        audit(ctx, doc["tenant_id"], "document.update", actor["id"], f"document:{doc['id']}", title, via)

    def do_delete(ctx: ReducerContext, actor: Row, doc: Row, via: str | None) -> None:
        ctx.db.document.delete(doc)
        audit(
            ctx, doc["tenant_id"], "document.delete", actor["id"], f"document:{doc['id']}", doc["title"], via
        )

    # --- lifecycle -----------------------------------------------------------------------------

    @mod.init
    def init(ctx: ReducerContext) -> None:
        for role, (description, perms) in ROLES.items():
            ctx.db.role.insert({"name": role, "description": description})
            for p in perms:
                ctx.db.role_permission.insert({"id": 0, "role": role, "permission": p})
        for ident in sorted(cfg.service_identities):
            ctx.db.service_account.insert(
                {"identity": ident, "label": "gatewayd service", "created_at": ctx.timestamp}
            )
        if cfg.seed:
            _seed(ctx)
        for ident, actor_id in cfg.identity_links.items():
            if ctx.db.actor.find(actor_id) is None:
                raise ValueError(f"identity_links: unknown actor {actor_id!r}")
            ctx.db.actor_identity_link.insert(
                {"identity": ident, "actor_id": actor_id, "issuer": "", "linked_at": ctx.timestamp}
            )

    @mod.client_connected
    def client_connected(ctx: ReducerContext) -> None:
        iss, sub = ctx.issuer, ctx.subject
        if iss is None or iss == cfg.local_issuer:
            return  # anonymous identities may connect (and read public tables)
        if cfg.trusted_issuers is not None and iss not in cfg.trusted_issuers:
            raise ReducerError(f"issuer {iss!r} is not trusted by this module")
        if cfg.audience is not None and cfg.audience not in ctx.audience:
            raise ReducerError(f"token audience {ctx.audience} does not include {cfg.audience!r}")
        actor = ctx.db.actor.find(sub) if sub else None
        if actor is None:
            return
        if actor["disabled"]:
            raise ReducerError(f"actor {sub} is disabled")
        link = ctx.db.actor_identity_link.find(ctx.sender)
        if link is None:
            ctx.db.actor_identity_link.insert(
                {"identity": ctx.sender, "actor_id": actor["id"], "issuer": iss, "linked_at": ctx.timestamp}
            )
        elif link["actor_id"] != actor["id"]:
            raise ReducerError(f"identity {ctx.sender} is linked to another actor")

    # --- native document reducers --------------------------------------------------------------

    @mod.reducer(tenant_id=STRING, title=STRING, body=STRING)
    def create_document(ctx: ReducerContext, tenant_id: str, title: str, body: str) -> None:
        actor = actor_of(ctx)
        check_claims_fresh(ctx, actor, tenant_id)
        require(ctx, actor, tenant_id, "document.create")
        do_create(ctx, actor, tenant_id, title, body, None)

    @mod.reducer(id=U64, title=STRING, body=STRING)
    def update_document(ctx: ReducerContext, id: int, title: str, body: str) -> None:
        actor = actor_of(ctx)
        doc = document(ctx, id)
        check_claims_fresh(ctx, actor, doc["tenant_id"])
        require(ctx, actor, doc["tenant_id"], "document.update")
        do_update(ctx, actor, doc, title, body, None)

    @mod.reducer(id=U64)
    def delete_document(ctx: ReducerContext, id: int) -> None:
        actor = actor_of(ctx)
        doc = document(ctx, id)
        check_claims_fresh(ctx, actor, doc["tenant_id"])
        require(ctx, actor, doc["tenant_id"], "document.delete")
        do_delete(ctx, actor, doc, None)

    @mod.reducer(tenant_id=STRING, permission=STRING)
    def assert_permission(ctx: ReducerContext, tenant_id: str, permission: str) -> None:
        """Checks a right and writes nothing (commits with no update)."""
        actor = actor_of(ctx)
        check_claims_fresh(ctx, actor, tenant_id)
        require(ctx, actor, tenant_id, permission)

    # --- delegated document reducers -----------------------------------------------------------

    def delegated(
        ctx: ReducerContext, actor_id: str, on_behalf_of: str | None, tenant_id: str, permission: str
    ) -> Row:
        if ctx.db.service_account.find(ctx.sender) is None:
            raise ReducerError("only the gateway's service identity may call delegated reducers")
        actor = ctx.db.actor.find(actor_id)
        if actor is None:
            raise ReducerError(f"no such actor: {actor_id}")
        if actor["disabled"]:
            raise ReducerError(f"actor {actor_id} is disabled")
        tenant(ctx, tenant_id)
        if on_behalf_of is None:
            if not allowed(ctx, actor, tenant_id, permission):
                raise ReducerError(f"{actor_id} may not {permission} in tenant {tenant_id}")
            return actor
        principal = ctx.db.actor.find(on_behalf_of)
        if principal is None or principal["kind"] != "user" or principal["disabled"]:
            raise ReducerError(f"{on_behalf_of} is not an active user")
        grants = [
            g
            for g in ctx.db.impersonation_grant.filter(grantee_actor_id=actor_id)
            if g["tenant_id"] == tenant_id and g["grantor_actor_id"] == on_behalf_of and not g["revoked"]
        ]
        if not grants:
            raise ReducerError(f"{on_behalf_of} has not delegated to {actor_id} in tenant {tenant_id}")
        if not allowed(ctx, principal, tenant_id, permission):
            raise ReducerError(f"{on_behalf_of} may not {permission} in tenant {tenant_id}")
        return actor

    @mod.reducer(actor_id=STRING, on_behalf_of=option(STRING), tenant_id=STRING, title=STRING, body=STRING)
    def create_document_as(
        ctx: ReducerContext, actor_id: str, on_behalf_of: str | None, tenant_id: str, title: str, body: str
    ) -> None:
        actor = delegated(ctx, actor_id, on_behalf_of, tenant_id, "document.create")
        do_create(ctx, actor, tenant_id, title, body, on_behalf_of)

    @mod.reducer(actor_id=STRING, on_behalf_of=option(STRING), id=U64, title=STRING, body=STRING)
    def update_document_as(
        ctx: ReducerContext,
        actor_id: str,
        on_behalf_of: str | None,
        id: int,
        title: str,
        body: str,
    ) -> None:
        if ctx.db.service_account.find(ctx.sender) is None:
            raise ReducerError("only the gateway's service identity may call delegated reducers")
        doc = document(ctx, id)
        actor = delegated(ctx, actor_id, on_behalf_of, doc["tenant_id"], "document.update")
        do_update(ctx, actor, doc, title, body, on_behalf_of)

    @mod.reducer(actor_id=STRING, on_behalf_of=option(STRING), id=U64)
    def delete_document_as(ctx: ReducerContext, actor_id: str, on_behalf_of: str | None, id: int) -> None:
        if ctx.db.service_account.find(ctx.sender) is None:
            raise ReducerError("only the gateway's service identity may call delegated reducers")
        doc = document(ctx, id)
        actor = delegated(ctx, actor_id, on_behalf_of, doc["tenant_id"], "document.delete")
        do_delete(ctx, actor, doc, on_behalf_of)

    # --- tenants and memberships (human-only) --------------------------------------------------

    @mod.reducer(id=STRING, name=STRING)
    def create_tenant(ctx: ReducerContext, id: str, name: str) -> None:
        actor = actor_of(ctx)
        require_human(actor)
        if not id or not name.strip():
            raise ReducerError("tenant id and name must not be empty")
        if ctx.db.tenant.find(id) is not None:
            raise ReducerError(f"tenant {id} already exists")
        ctx.db.tenant.insert({"id": id, "name": name, "created_at": ctx.timestamp})
        ctx.db.membership.insert(
            {
                "id": 0,
                "tenant_id": id,
                "actor_id": actor["id"],
                "role": "owner",
                "version": 1,
                "updated_at": ctx.timestamp,
            }
        )
        audit(ctx, id, "tenant.create", actor["id"], f"tenant:{id}", name)

    def manager(ctx: ReducerContext, tenant_id: str) -> Row:
        actor = actor_of(ctx)
        require_human(actor)
        check_claims_fresh(ctx, actor, tenant_id)
        require(ctx, actor, tenant_id, "membership.manage")
        return actor

    def check_role(role: str) -> None:
        if role not in ROLES:
            raise ReducerError(f"no such role: {role}")

    @mod.reducer(tenant_id=STRING, actor_id=STRING, role=STRING)
    def add_member(ctx: ReducerContext, tenant_id: str, actor_id: str, role: str) -> None:
        actor = manager(ctx, tenant_id)
        check_role(role)
        if ctx.db.actor.find(actor_id) is None:
            raise ReducerError(f"no such actor: {actor_id}")
        if membership(ctx, tenant_id, actor_id) is not None:
            raise ReducerError(f"{actor_id} is already a member of {tenant_id}")
        ctx.db.membership.insert(
            {
                "id": 0,
                "tenant_id": tenant_id,
                "actor_id": actor_id,
                "role": role,
                "version": 1,
                "updated_at": ctx.timestamp,
            }
        )
        audit(ctx, tenant_id, "membership.add", actor["id"], f"actor:{actor_id}", role)

    @mod.reducer(tenant_id=STRING, actor_id=STRING, role=STRING)
    def set_member_role(ctx: ReducerContext, tenant_id: str, actor_id: str, role: str) -> None:
        actor = manager(ctx, tenant_id)
        check_role(role)
        m = membership(ctx, tenant_id, actor_id)
        if m is None:
            raise ReducerError(f"{actor_id} is not a member of {tenant_id}")
        if m["role"] == role:
            return
        ctx.db.membership.update(
            {**m, "role": role, "version": m["version"] + 1, "updated_at": ctx.timestamp}
        )
        audit(ctx, tenant_id, "membership.role", actor["id"], f"actor:{actor_id}", role)

    @mod.reducer(tenant_id=STRING, actor_id=STRING)
    def remove_member(ctx: ReducerContext, tenant_id: str, actor_id: str) -> None:
        actor = manager(ctx, tenant_id)
        m = membership(ctx, tenant_id, actor_id)
        if m is None:
            raise ReducerError(f"{actor_id} is not a member of {tenant_id}")
        owners = [x for x in ctx.db.membership.filter(tenant_id=tenant_id) if x["role"] == "owner"]
        if m["role"] == "owner" and len(owners) == 1:
            raise ReducerError(f"{actor_id} is the last owner of {tenant_id}")
        ctx.db.membership.delete(m)
        audit(ctx, tenant_id, "membership.remove", actor["id"], f"actor:{actor_id}")

    # --- grants (human-only) -------------------------------------------------------------------

    @mod.reducer(key_id=STRING, tenant_id=STRING, robot_actor_id=STRING, scopes=ArrayT(STRING), enabled=BOOL)
    def set_api_key_grant(
        ctx: ReducerContext,
        key_id: str,
        tenant_id: str,
        robot_actor_id: str,
        scopes: list[str],
        enabled: bool,
    ) -> None:
        actor = actor_of(ctx)
        require_human(actor)
        require(ctx, actor, tenant_id, "grant.manage")
        robot = ctx.db.actor.find(robot_actor_id)
        if robot is None or robot["kind"] != "robot":
            raise ReducerError(f"{robot_actor_id} is not a robot")
        unknown = [s for s in scopes if s not in PERMISSIONS]
        if unknown:
            raise ReducerError(f"unknown scopes: {', '.join(unknown)}")
        old = ctx.db.api_key_grant.find(key_id)
        if old is not None and old["tenant_id"] != tenant_id:
            raise ReducerError(f"api key {key_id} belongs to another tenant")
        ctx.db.api_key_grant.upsert(
            {
                "key_id": key_id,
                "tenant_id": tenant_id,
                "robot_actor_id": robot_actor_id,
                "scopes": list(scopes),
                "version": 1 if old is None else old["version"] + 1,
                "enabled": enabled,
                "updated_at": ctx.timestamp,
            }
        )
        audit(ctx, tenant_id, "grant.api_key", actor["id"], f"api_key:{key_id}", ",".join(scopes))

    @mod.reducer(key_id=STRING)
    def revoke_api_key(ctx: ReducerContext, key_id: str) -> None:
        actor = actor_of(ctx)
        require_human(actor)
        grant = ctx.db.api_key_grant.find(key_id)
        if grant is None:
            raise ReducerError(f"no such api key: {key_id}")
        require(ctx, actor, grant["tenant_id"], "grant.manage")
        ctx.db.api_key_grant.update(
            {**grant, "enabled": False, "version": grant["version"] + 1, "updated_at": ctx.timestamp}
        )
        audit(ctx, grant["tenant_id"], "grant.revoke_api_key", actor["id"], f"api_key:{key_id}")

    @mod.reducer(tenant_id=STRING, grantee_actor_id=STRING)
    def grant_impersonation(ctx: ReducerContext, tenant_id: str, grantee_actor_id: str) -> None:
        actor = actor_of(ctx)
        require_human(actor)
        tenant(ctx, tenant_id)
        if membership(ctx, tenant_id, actor["id"]) is None:
            raise ReducerError(f"{actor['id']} is not a member of {tenant_id}")
        if ctx.db.actor.find(grantee_actor_id) is None:
            raise ReducerError(f"no such actor: {grantee_actor_id}")
        ctx.db.impersonation_grant.insert(
            {
                "id": 0,
                "tenant_id": tenant_id,
                "grantor_actor_id": actor["id"],
                "grantee_actor_id": grantee_actor_id,
                "created_at": ctx.timestamp,
                "revoked": False,
            }
        )
        audit(ctx, tenant_id, "grant.impersonation", actor["id"], f"actor:{grantee_actor_id}")

    @mod.reducer(id=U64)
    def revoke_impersonation(ctx: ReducerContext, id: int) -> None:
        actor = actor_of(ctx)
        grant = ctx.db.impersonation_grant.find(id)
        if grant is None:
            raise ReducerError(f"no such impersonation grant: {id}")
        if grant["grantor_actor_id"] != actor["id"]:
            require(ctx, actor, grant["tenant_id"], "grant.manage")
        if not grant["revoked"]:
            ctx.db.impersonation_grant.update({**grant, "revoked": True})
            audit(ctx, grant["tenant_id"], "grant.revoke_impersonation", actor["id"], f"grant:{id}")

    # --- identity migration --------------------------------------------------------------------

    @mod.reducer(from_identity=IDENTITY, to_identity=IDENTITY, issuer=STRING)
    def migrate_identity_link(ctx: ReducerContext, from_identity: str, to_identity: str, issuer: str) -> None:
        """Service-only: link ``to_identity`` (a new issuer's identity) to the actor ``from_identity``
        is linked to (``gatewayd identity plan-migration --apply``). Idempotent."""
        if ctx.db.service_account.find(ctx.sender) is None:
            raise ReducerError("only the gatewayd service may migrate identity links")
        old = ctx.db.actor_identity_link.find(from_identity)
        if old is None:
            raise ReducerError(f"identity {from_identity} is not linked to any actor")
        current = ctx.db.actor_identity_link.find(to_identity)
        if current is not None:
            if current["actor_id"] == old["actor_id"]:
                return  # already linked to the same actor: nothing changes
            raise ReducerError(f"identity {to_identity} is already linked to {current['actor_id']}")
        link = {"identity": to_identity, "actor_id": old["actor_id"], "issuer": issuer}
        ctx.db.actor_identity_link.insert({**link, "linked_at": ctx.timestamp})

    # --- canary --------------------------------------------------------------------------------

    @mod.reducer(name=STRING)
    def bump_canary(ctx: ReducerContext, name: str) -> None:
        """Increment a canary row: every call commits a change (a liveness probe for gatewayd)."""
        if ctx.db.service_account.find(ctx.sender) is None:
            actor = actor_of(ctx)
            if not any(allowed(ctx, actor, t["id"], "canary.write") for t in ctx.db.tenant.iter()):
                raise ReducerError(f"{actor['id']} may not write canaries")
        if not name or len(name) > 64:
            raise ReducerError("canary name must be 1-64 characters")
        row = ctx.db.canary.find(name)
        ctx.db.canary.upsert(
            {
                "name": name,
                "counter": (row["counter"] if row else 0) + 1,
                "updated_at": ctx.timestamp,
                "updated_by": ctx.sender,
            }
        )

    return mod


def _seed(ctx: ReducerContext) -> None:
    ts = ctx.timestamp
    db = ctx.db
    for tid, tname in (("acme", "Acme Corp"), ("globex", "Globex Inc")):
        db.tenant.insert({"id": tid, "name": tname, "created_at": ts})
    actors: list[tuple[str, str, str]] = [
        ("user:alice", "user", "Alice"),
        ("user:bob", "user", "Bob"),
        ("user:carol", "user", "Carol"),
        ("robot:importer", "robot", "Importer bot"),
    ]
    for aid, kind, display in actors:
        db.actor.insert({"id": aid, "kind": kind, "display_name": display, "disabled": False})
    memberships: list[tuple[str, str, str]] = [
        ("acme", "user:alice", "owner"),
        ("acme", "user:bob", "editor"),
        ("globex", "user:bob", "viewer"),
        ("globex", "user:carol", "owner"),
    ]
    for tid, aid, role in memberships:
        db.membership.insert(
            {"id": 0, "tenant_id": tid, "actor_id": aid, "role": role, "version": 1, "updated_at": ts}
        )
    db.api_key_grant.insert(
        {
            "key_id": "ak-1",
            "tenant_id": "acme",
            "robot_actor_id": "robot:importer",
            "scopes": ["document.create", "document.update"],
            "version": 1,
            "enabled": True,
            "updated_at": ts,
        }
    )
    db.impersonation_grant.insert(
        {
            "id": 0,
            "tenant_id": "acme",
            "grantor_actor_id": "user:bob",
            "grantee_actor_id": "robot:importer",
            "created_at": ts,
            "revoked": False,
        }
    )
    docs: list[dict[str, Any]] = [
        {"tenant_id": "acme", "title": "Welcome to Acme", "body": "Start here."},
        {"tenant_id": "acme", "title": "Quarterly plan", "body": "Ship the gateway."},
        {"tenant_id": "globex", "title": "Globex handbook", "body": "Rule 1: be excellent."},
    ]
    for d in docs:
        db.document.insert({"id": 0, **d, "updated_at": ts, "updated_by": ctx.database_identity})
    db.canary.insert({"name": "gateway", "counter": 0, "updated_at": ts, "updated_by": ctx.database_identity})

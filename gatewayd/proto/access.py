"""Authorization from tables: who may read which tenant's streams, decided from projected rows.

Theory of operation
-------------------
Token claims say who a caller *is*; what they may *do* changes while their token is still valid
(a membership is removed, a role loses a permission, an API key grant is disabled). So gatewayd
projects the module's membership, role-permission and API-key-grant tables (names and columns from
config) and decides from them, on every stream open and again after every change to them:

* a **human** (``user:...``) may use permission P in tenant T iff a membership row
  (actor = subject, tenant = T) exists and its role grants P;
* a **robot** (``robot:...``) iff an enabled API-key grant for (robot, T) lists P in its scopes.

``apply`` takes the access tables' row changes (sync) and returns the (subject, tenant) pairs whose
rights may have changed, so the streams service can re-check exactly those subscribers.

**Grant boundaries.** When a right appears (a new membership, a role that gains the permission),
``grant_seq`` records each partition's event sequence at that moment; a resume from a cursor below
it must not replay anything from before the grant (the event log's ``floor``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from gatewayd.proto.cache import RowChange


class AccessTables(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Names of the access tables and their columns (the ``[access]`` config section)."""

    membership_table: str = "membership"
    membership_actor_column: str = "actor_id"
    membership_tenant_column: str = "tenant_id"
    membership_role_column: str = "role"
    membership_version_column: str | None = "version"
    role_permission_table: str = "role_permission"
    role_column: str = "role"
    permission_column: str = "permission"
    api_key_grant_table: str | None = "api_key_grant"
    grant_robot_column: str = "robot_actor_id"
    grant_tenant_column: str = "tenant_id"
    grant_scopes_column: str = "scopes"
    grant_enabled_column: str = "enabled"

    @property
    def tables(self) -> tuple[str, ...]:
        t = (self.membership_table, self.role_permission_table)
        return (*t, self.api_key_grant_table) if self.api_key_grant_table else t


class AccessIndex:
    """In-memory rights, rebuilt incrementally from the access tables' row changes."""

    def __init__(self, tables: AccessTables) -> None:
        self.t = tables
        # (actor, tenant) -> {membership key: (role, version)}
        self._members: dict[tuple[str, str], dict[Any, tuple[str, int | None]]] = defaultdict(dict)
        self._member_rows: dict[Any, tuple[str, str]] = {}
        self._role_perms: dict[str, set[str]] = defaultdict(set)
        self._perm_rows: dict[Any, tuple[str, str]] = {}
        # (robot, tenant) -> {grant key: scopes if enabled}
        self._grants: dict[tuple[str, str], dict[Any, frozenset[str]]] = defaultdict(dict)
        self._grant_rows: dict[Any, tuple[str, str]] = {}
        self.loaded = False

    # --- queries ---------------------------------------------------------------------------------

    def permissions(self, subject: str, tenant: str) -> frozenset[str]:
        if subject.startswith("robot:"):
            out: set[str] = set()
            for scopes in self._grants.get((subject, tenant), {}).values():
                out |= scopes
            return frozenset(out)
        perms: set[str] = set()
        for role, _v in self._members.get((subject, tenant), {}).values():
            perms |= self._role_perms.get(role, set())
        return frozenset(perms)

    def can(self, subject: str, tenant: str, permission: str) -> bool:
        return permission in self.permissions(subject, tenant)

    def tenants(self, subject: str) -> list[str]:
        src = self._grants if subject.startswith("robot:") else self._members
        return sorted(t for (a, t), rows in src.items() if a == subject and rows)

    def membership_version(self, subject: str, tenant: str) -> int | None:
        versions = [v for _r, v in self._members.get((subject, tenant), {}).values() if v is not None]
        return max(versions) if versions else None

    # --- updates ---------------------------------------------------------------------------------

    def apply(self, changes: Iterable[RowChange]) -> set[tuple[str, str]]:
        """Apply access-table changes; return the (subject, tenant) pairs to re-check.

        A role-permission change affects every member holding that role, so it returns them all.
        """
        t = self.t
        touched: set[tuple[str, str]] = set()
        roles_touched: set[str] = set()
        for ch in changes:
            if ch.table == t.membership_table:
                touched |= self._apply_member(ch)
            elif ch.table == t.role_permission_table:
                roles_touched |= self._apply_perm(ch)
            elif t.api_key_grant_table and ch.table == t.api_key_grant_table:
                touched |= self._apply_grant(ch)
        if roles_touched:
            for pair, rows in self._members.items():
                if any(role in roles_touched for role, _v in rows.values()):
                    touched.add(pair)
        return touched

    def _upsert(
        self,
        ch: RowChange,
        rows: dict[Any, tuple[str, str]],
        parse: Callable[[Any], tuple[tuple[str, str], Any] | None],
        store: dict[tuple[str, str], dict[Any, Any]],
    ) -> set[tuple[str, str]]:
        touched: set[tuple[str, str]] = set()
        old = rows.pop(ch.key, None)
        if old is not None:
            store[old].pop(ch.key, None)
            if not store[old]:
                del store[old]
            touched.add(old)
        if ch.kind in ("inserted", "updated"):
            parsed = parse(ch.row)
            if parsed is not None:
                pair, value = parsed
                rows[ch.key] = pair
                store[pair][ch.key] = value
                touched.add(pair)
        return touched

    def _apply_member(self, ch: RowChange) -> set[tuple[str, str]]:
        t = self.t

        def parse(row: Any) -> tuple[tuple[str, str], tuple[str, int | None]] | None:
            actor, tenant, role = (row.get(t.membership_actor_column), row.get(t.membership_tenant_column),
                                   row.get(t.membership_role_column))  # fmt: skip
            if not (isinstance(actor, str) and isinstance(tenant, str) and isinstance(role, str)):
                return None
            v = row.get(t.membership_version_column) if t.membership_version_column else None
            return (actor, tenant), (role, v if isinstance(v, int) else None)

        return self._upsert(ch, self._member_rows, parse, self._members)

    def _apply_grant(self, ch: RowChange) -> set[tuple[str, str]]:
        t = self.t

        def parse(row: Any) -> tuple[tuple[str, str], frozenset[str]] | None:
            robot, tenant = row.get(t.grant_robot_column), row.get(t.grant_tenant_column)
            scopes, enabled = row.get(t.grant_scopes_column), row.get(t.grant_enabled_column)
            if not (isinstance(robot, str) and isinstance(tenant, str) and isinstance(scopes, list)):
                return None
            if enabled is not True:
                return None
            return (robot, tenant), frozenset(s for s in scopes if isinstance(s, str))

        return self._upsert(ch, self._grant_rows, parse, self._grants)

    def _apply_perm(self, ch: RowChange) -> set[str]:
        t = self.t
        touched: set[str] = set()
        old = self._perm_rows.pop(ch.key, None)
        if old is not None:
            role, perm = old
            self._role_perms[role].discard(perm)
            touched.add(role)
        if ch.kind in ("inserted", "updated"):
            role, perm = ch.row.get(t.role_column), ch.row.get(t.permission_column)
            if isinstance(role, str) and isinstance(perm, str):
                self._perm_rows[ch.key] = (role, perm)
                self._role_perms[role].add(perm)
                touched.add(role)
        return touched

"""Module schema: ``RawModuleDefV9`` JSON (``GET /v1/database/{db}/schema?version=9``), sans-IO.

:func:`parse_module_def` reads what a generic client needs (tables with row types, primary keys and
access, reducers with parameter types, procedures) and keeps the typespace for decoding.
:meth:`ModuleSchema.to_json` writes the same document back; the dev peer serves it and the round
trip is tested, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gatewayd.errors import SchemaError
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import (
    AlgebraicType,
    Product,
    Typespace,
    type_from_json,
    type_to_json,
)

Lifecycle = Literal["Init", "OnConnect", "OnDisconnect"]
IndexAlgorithm = Literal["BTree", "Hash", "Direct"]


@dataclass(frozen=True, slots=True)
class IndexDef:
    name: str | None
    accessor_name: str | None
    algorithm: IndexAlgorithm
    columns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TableDef:
    name: str
    product_type_ref: int
    row_type: Product
    primary_key: tuple[int, ...] = ()
    public: bool = True
    indexes: tuple[IndexDef, ...] = ()
    unique: tuple[tuple[int, ...], ...] = ()
    auto_inc: tuple[int, ...] = ()
    is_system: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(e.name if e.name is not None else str(i) for i, e in enumerate(self.row_type.elements))

    @property
    def pk_column(self) -> str | None:
        """The single primary-key column's name, if the table has exactly one."""
        if len(self.primary_key) != 1:
            return None
        return self.columns[self.primary_key[0]]


@dataclass(frozen=True, slots=True)
class ReducerDef:
    name: str
    params: Product
    lifecycle: Lifecycle | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(e.name if e.name is not None else str(i) for i, e in enumerate(self.params.elements))


@dataclass(frozen=True, slots=True)
class ProcedureDef:
    name: str
    params: Product
    return_type: AlgebraicType


@dataclass(slots=True)
class ModuleSchema:
    typespace: Typespace
    tables: dict[str, TableDef] = field(default_factory=dict)
    reducers: dict[str, ReducerDef] = field(default_factory=dict)
    procedures: dict[str, ProcedureDef] = field(default_factory=dict)
    type_names: dict[int, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    _codec: ValueCodec | None = None

    @property
    def codec(self) -> ValueCodec:
        """The JSON-ready value codec over this schema's typespace (compiled decoders cached)."""
        if self._codec is None:
            self._codec = ValueCodec(self.typespace)
        return self._codec

    @property
    def fingerprint(self) -> str:
        """A stable hash of the schema document, to tell a changed schema (hotswap) from the same."""
        doc = self.raw or self.to_json()
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def table(self, name: str) -> TableDef:
        try:
            return self.tables[name]
        except KeyError:
            raise SchemaError(f"the module has no table {name!r}") from None

    def reducer(self, name: str) -> ReducerDef:
        try:
            return self.reducers[name]
        except KeyError:
            raise SchemaError(f"the module has no reducer {name!r}") from None

    def to_json(self) -> dict[str, Any]:
        """RawModuleDefV9 as SATS-JSON, shaped as SpacetimeDB serves it."""

        def opt(v: Any) -> dict[str, Any]:
            return {"some": v} if v is not None else {"none": []}

        tables = []
        for t in self.tables.values():
            constraints = [
                {"name": opt(f"{t.name}_{'_'.join(t.columns[c] for c in cols)}_key"),
                 "data": {"Unique": {"columns": list(cols)}}}
                for cols in t.unique
            ]  # fmt: skip
            sequences = [
                {"name": opt(f"{t.name}_{t.columns[c]}_seq"), "column": c, "start": opt(None),
                 "min_value": opt(None), "max_value": opt(None), "increment": 1}
                for c in t.auto_inc
            ]  # fmt: skip
            indexes = [
                {
                    "name": opt(ix.name),
                    "accessor_name": opt(ix.accessor_name),
                    "algorithm": {ix.algorithm: {"column": ix.columns[0]}}
                    if ix.algorithm == "Direct"
                    else {ix.algorithm: {"columns": list(ix.columns)}},
                }
                for ix in t.indexes
            ]
            tables.append(
                {
                    "name": t.name,
                    "product_type_ref": t.product_type_ref,
                    "primary_key": list(t.primary_key),
                    "indexes": indexes,
                    "constraints": constraints,
                    "sequences": sequences,
                    "schedule": {"none": []},
                    "table_type": {"System": []} if t.is_system else {"User": []},
                    "table_access": {"Public": []} if t.public else {"Private": []},
                }
            )
        reducers = [
            {
                "name": r.name,
                "params": type_to_json(r.params)["Product"],
                "lifecycle": {"some": {r.lifecycle: []}} if r.lifecycle else {"none": []},
            }
            for r in self.reducers.values()
        ]
        misc = [
            {
                "Procedure": {
                    "name": p.name,
                    "params": type_to_json(p.params)["Product"],
                    "return_type": type_to_json(p.return_type),
                }
            }
            for p in self.procedures.values()
        ]
        types = [
            {"name": {"scope": [], "name": name}, "ty": ref, "custom_ordering": True}
            for ref, name in sorted(self.type_names.items())
        ]
        return {
            "typespace": {"types": [type_to_json(t) for t in self.typespace.types]},
            "tables": tables,
            "reducers": reducers,
            "types": types,
            "misc_exports": misc,
            "row_level_security": [],
        }


def _opt(raw: Any, where: str) -> Any:
    """SATS-JSON Option: {"some": v} -> v, {"none": []} -> None; a bare value or null is tolerated."""
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((k, v),) = raw.items()
        if k == "some":
            return v
        if k == "none":
            return None
    if raw is None or isinstance(raw, str | int):
        return raw
    raise SchemaError(f"{where}: expected an Option ({{'some': v}} or {{'none': []}}), got {raw!r:.60}")


def _unit_enum(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, Mapping) and len(raw) == 1:
        return str(next(iter(raw)))
    raise SchemaError(f"{where}: expected a unit enum like {{'Public': []}}, got {raw!r:.60}")


def _cols(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(c, int) and c >= 0 for c in raw):
        raise SchemaError(f"{where}: expected a list of column indexes")
    return tuple(raw)


def _product(raw: Any, where: str) -> Product:
    ty = type_from_json({"Product": raw}, where)
    assert isinstance(ty, Product)
    return ty


def parse_module_def(doc: Any) -> ModuleSchema:
    """Parse RawModuleDefV9 JSON. Errors name the table, reducer or type that is wrong."""
    if not isinstance(doc, Mapping):
        raise SchemaError("module schema must be a JSON object")
    if "V9" in doc and len(doc) == 1:  # RawModuleDef::V9 wrapper
        doc = doc["V9"]
    try:
        raw_types = doc["typespace"]["types"]
    except (KeyError, TypeError):
        raise SchemaError("module schema has no typespace.types") from None
    if not isinstance(raw_types, list):
        raise SchemaError("typespace.types must be a list")
    ts = Typespace([type_from_json(t, f"typespace.types[{i}]") for i, t in enumerate(raw_types)])
    schema = ModuleSchema(typespace=ts, raw=dict(doc))
    for ref_name in doc.get("types", []) or []:
        try:
            schema.type_names[int(ref_name["ty"])] = str(ref_name["name"]["name"])
        except (KeyError, TypeError, ValueError):
            continue  # names are informational
    for i, t in enumerate(doc.get("tables", [])):
        where = f"tables[{i}]"
        if not isinstance(t, Mapping) or not isinstance(t.get("name"), str):
            raise SchemaError(f"{where}: a table needs a name")
        where = f"table {t['name']!r}"
        ref = t.get("product_type_ref")
        if not isinstance(ref, int) or not 0 <= ref < len(ts):
            raise SchemaError(f"{where}: product_type_ref {ref!r} is not in the typespace")
        row_type = ts.resolve(ts.types[ref])
        if not isinstance(row_type, Product):
            raise SchemaError(f"{where}: row type must be a product")
        pk = _cols(t.get("primary_key", []), f"{where}.primary_key")
        if any(c >= len(row_type.elements) for c in pk):
            raise SchemaError(f"{where}: primary key column out of range")
        indexes = []
        for j, ix in enumerate(t.get("indexes", []) or []):
            algo_raw = ix.get("algorithm", {}) if isinstance(ix, Mapping) else {}
            if not isinstance(algo_raw, Mapping) or len(algo_raw) != 1:
                raise SchemaError(f"{where}.indexes[{j}]: bad algorithm")
            ((algo, body),) = algo_raw.items()
            if algo not in ("BTree", "Hash", "Direct"):
                raise SchemaError(f"{where}.indexes[{j}]: unknown index algorithm {algo!r}")
            if isinstance(body, Mapping):
                cols = _cols(body["columns"], where) if "columns" in body else (int(body["column"]),)
            else:
                cols = _cols(body, where) if isinstance(body, list) else (int(body),)
            indexes.append(
                IndexDef(_opt(ix.get("name"), where), _opt(ix.get("accessor_name"), where), algo, cols)
            )
        unique = []
        for c in t.get("constraints", []) or []:
            data = c.get("data", {}) if isinstance(c, Mapping) else {}
            if isinstance(data, Mapping) and "Unique" in data:
                u = data["Unique"]
                unique.append(_cols(u["columns"] if isinstance(u, Mapping) else u, where))
        auto_inc = tuple(int(s["column"]) for s in t.get("sequences", []) or [] if isinstance(s, Mapping))
        access = _unit_enum(t.get("table_access", {"Public": []}), f"{where}.table_access")
        ttype = _unit_enum(t.get("table_type", {"User": []}), f"{where}.table_type")
        schema.tables[t["name"]] = TableDef(
            name=t["name"],
            product_type_ref=ref,
            row_type=row_type,
            primary_key=pk,
            public=access == "Public",
            indexes=tuple(indexes),
            unique=tuple(unique),
            auto_inc=auto_inc,
            is_system=ttype == "System",
        )
    for i, r in enumerate(doc.get("reducers", [])):
        if not isinstance(r, Mapping) or not isinstance(r.get("name"), str):
            raise SchemaError(f"reducers[{i}]: a reducer needs a name")
        where = f"reducer {r['name']!r}"
        lc = _opt(r.get("lifecycle", {"none": []}), f"{where}.lifecycle")
        lifecycle = _unit_enum(lc, f"{where}.lifecycle") if lc is not None else None
        if lifecycle not in (None, "Init", "OnConnect", "OnDisconnect"):
            raise SchemaError(f"{where}: unknown lifecycle {lifecycle!r}")
        schema.reducers[r["name"]] = ReducerDef(
            r["name"],
            _product(r.get("params", {"elements": []}), f"{where}.params"),
            lifecycle,  # type: ignore[arg-type]
        )
    for export in doc.get("misc_exports", []) or []:
        if isinstance(export, Mapping) and "Procedure" in export:
            p = export["Procedure"]
            where = f"procedure {p.get('name')!r}"
            schema.procedures[str(p["name"])] = ProcedureDef(
                str(p["name"]),
                _product(p.get("params", {"elements": []}), f"{where}.params"),
                type_from_json(p.get("return_type", {"Product": {"elements": []}}), where),
            )
    return schema

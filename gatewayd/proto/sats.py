"""SpacetimeDB algebraic types (SATS): the type model, SATS-JSON parsing and emission.

A type is one of the frozen dataclasses below. ``Ref(n)`` points into a :class:`Typespace`, which
resolves it; recursive types are allowed (a Ref may point, directly or not, to itself).

Special one-field products (Identity, ConnectionId, Timestamp, TimeDuration, Uuid) and the special
sums (Option, Result, ScheduleAt) are recognised structurally, by field and variant names, exactly as
SpacetimeDB does (PROTOCOL.md §3.1, §4.3). They stay ordinary :class:`Product`/:class:`Sum` values;
:func:`special_kind` tells what they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from gatewayd.errors import SchemaError

PrimName = Literal[
    "Bool", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64",
    "I128", "U128", "I256", "U256", "F32", "F64", "String",
]  # fmt: skip

PRIM_NAMES: Final[frozenset[str]] = frozenset(PrimName.__args__)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Prim:
    """A builtin scalar: integers, floats, bool or string."""

    name: PrimName


@dataclass(frozen=True, slots=True)
class ArrayT:
    """``Array<elem>``. ``Array<U8>`` is the bytes type."""

    elem: AlgebraicType


@dataclass(frozen=True, slots=True)
class Element:
    """A product field or a sum variant: an optional name and a type."""

    name: str | None
    ty: AlgebraicType


@dataclass(frozen=True, slots=True)
class Product:
    elements: tuple[Element, ...]


@dataclass(frozen=True, slots=True)
class Sum:
    variants: tuple[Element, ...]


@dataclass(frozen=True, slots=True)
class Ref:
    index: int


AlgebraicType: TypeAlias = Prim | ArrayT | Product | Sum | Ref

# Constructors for the common cases (used by tests, the dev peer and the message codec).
BOOL: Final = Prim("Bool")
U8: Final = Prim("U8")
I8: Final = Prim("I8")
U16: Final = Prim("U16")
I16: Final = Prim("I16")
U32: Final = Prim("U32")
I32: Final = Prim("I32")
U64: Final = Prim("U64")
I64: Final = Prim("I64")
U128: Final = Prim("U128")
I128: Final = Prim("I128")
U256: Final = Prim("U256")
I256: Final = Prim("I256")
F32: Final = Prim("F32")
F64: Final = Prim("F64")
STRING: Final = Prim("String")
BYTES: Final = ArrayT(U8)
UNIT: Final = Product(())

IDENTITY_FIELD: Final = "__identity__"
CONNECTION_ID_FIELD: Final = "__connection_id__"
TIMESTAMP_FIELD: Final = "__timestamp_micros_since_unix_epoch__"
TIME_DURATION_FIELD: Final = "__time_duration_micros__"
UUID_FIELD: Final = "__uuid__"

IDENTITY: Final = Product((Element(IDENTITY_FIELD, U256),))
CONNECTION_ID: Final = Product((Element(CONNECTION_ID_FIELD, U128),))
TIMESTAMP: Final = Product((Element(TIMESTAMP_FIELD, I64),))
TIME_DURATION: Final = Product((Element(TIME_DURATION_FIELD, I64),))
UUID: Final = Product((Element(UUID_FIELD, U128),))
SCHEDULE_AT: Final = Sum((Element("Interval", TIME_DURATION), Element("Time", TIMESTAMP)))


def product(**fields: AlgebraicType) -> Product:
    """``product(id=U64, name=STRING)``: a named product in keyword order."""
    return Product(tuple(Element(k, v) for k, v in fields.items()))


def sum_of(**variants: AlgebraicType) -> Sum:
    return Sum(tuple(Element(k, v) for k, v in variants.items()))


def option(inner: AlgebraicType) -> Sum:
    """``Option<T>``: ``some`` is tag 0 and ``none`` is tag 1 (PROTOCOL.md §3.1)."""
    return Sum((Element("some", inner), Element("none", UNIT)))


def result(ok: AlgebraicType, err: AlgebraicType) -> Sum:
    return Sum((Element("ok", ok), Element("err", err)))


SpecialKind = Literal[
    "identity", "connection_id", "timestamp", "time_duration", "uuid", "option", "result", "bytes"
]

_SPECIAL_PRODUCTS: Final[dict[tuple[str, PrimName], SpecialKind]] = {
    (IDENTITY_FIELD, "U256"): "identity",
    (CONNECTION_ID_FIELD, "U128"): "connection_id",
    (TIMESTAMP_FIELD, "I64"): "timestamp",
    (TIME_DURATION_FIELD, "I64"): "time_duration",
    (UUID_FIELD, "U128"): "uuid",
}


def special_kind(ty: AlgebraicType) -> SpecialKind | None:
    """Name the special type ``ty`` is, structurally, or None for an ordinary type."""
    if isinstance(ty, Product):
        if len(ty.elements) == 1:
            el = ty.elements[0]
            if el.name is not None and isinstance(el.ty, Prim):
                return _SPECIAL_PRODUCTS.get((el.name, el.ty.name))
        return None
    if isinstance(ty, Sum):
        names = tuple(v.name for v in ty.variants)
        if names == ("some", "none") and ty.variants[1].ty == UNIT:
            return "option"
        if names == ("ok", "err"):
            return "result"
        return None
    if isinstance(ty, ArrayT) and ty.elem == U8:
        return "bytes"
    return None


class Typespace:
    """The module's type table: resolves ``Ref(n)`` to ``types[n]``."""

    __slots__ = ("types",)

    def __init__(self, types: Sequence[AlgebraicType] = ()) -> None:
        self.types: tuple[AlgebraicType, ...] = tuple(types)

    def resolve(self, ty: AlgebraicType) -> AlgebraicType:
        """Follow Refs until a non-Ref type; a cycle of bare Refs is a schema error."""
        seen = 0
        while isinstance(ty, Ref):
            if not 0 <= ty.index < len(self.types):
                raise SchemaError(f"type reference {ty.index} is outside the typespace")
            ty = self.types[ty.index]
            seen += 1
            if seen > len(self.types):
                raise SchemaError("type references form a cycle with no concrete type")
        return ty

    def __len__(self) -> int:
        return len(self.types)

    def __iter__(self) -> Iterator[AlgebraicType]:
        return iter(self.types)


EMPTY_TYPESPACE: Final = Typespace()


# --- SATS-JSON ---------------------------------------------------------------------------------
# AlgebraicType as it appears in RawModuleDefV9 (PROTOCOL.md §4.3):
#   {"Ref": n} | {"Product": {"elements": [...]}} | {"Sum": {"variants": [...]}} | {"Array": T}
#   | {"String": []} | {"U64": []} ...   Each element is {"name": {"some": "x"} | {"none": []},
#   "algebraic_type": T}.


def _name_from_json(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((k, v),) = raw.items()
        if k == "some" and isinstance(v, str):
            return v
        if k == "none":
            return None
    raise SchemaError(f"{where}: element name must be {{'some': str}} or {{'none': []}}, got {raw!r}")


def type_from_json(raw: Any, where: str = "type") -> AlgebraicType:
    """Parse one SATS-JSON AlgebraicType; errors name ``where``."""
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise SchemaError(f"{where}: an AlgebraicType is an object with one key, got {raw!r:.80}")
    ((tag, body),) = raw.items()
    if tag in PRIM_NAMES:
        return Prim(tag)
    if tag == "Ref":
        if not isinstance(body, int) or isinstance(body, bool) or body < 0:
            raise SchemaError(f"{where}: Ref must be a non-negative integer, got {body!r}")
        return Ref(body)
    if tag == "Array":
        return ArrayT(type_from_json(body, f"{where}.Array"))
    if tag in ("Product", "Sum"):
        key = "elements" if tag == "Product" else "variants"
        if not isinstance(body, Mapping) or not isinstance(body.get(key), list):
            raise SchemaError(f"{where}: {tag} needs a '{key}' list")
        elems = []
        for i, el in enumerate(body[key]):
            w = f"{where}.{tag}[{i}]"
            if not isinstance(el, Mapping) or "algebraic_type" not in el:
                raise SchemaError(f"{w}: needs 'algebraic_type'")
            elems.append(Element(_name_from_json(el.get("name"), w), type_from_json(el["algebraic_type"], w)))
        if tag == "Product":
            return Product(tuple(elems))
        if len(elems) > 256:
            raise SchemaError(f"{where}: a sum has at most 256 variants (u8 tag)")
        return Sum(tuple(elems))
    raise SchemaError(f"{where}: unknown AlgebraicType tag {tag!r}")


def _name_to_json(name: str | None) -> dict[str, Any]:
    return {"some": name} if name is not None else {"none": []}


def type_to_json(ty: AlgebraicType) -> dict[str, Any]:
    """Emit SATS-JSON for ``ty`` (inverse of :func:`type_from_json`)."""
    if isinstance(ty, Prim):
        return {ty.name: []}
    if isinstance(ty, Ref):
        return {"Ref": ty.index}
    if isinstance(ty, ArrayT):
        return {"Array": type_to_json(ty.elem)}
    if isinstance(ty, Product):
        return {
            "Product": {
                "elements": [
                    {"name": _name_to_json(e.name), "algebraic_type": type_to_json(e.ty)} for e in ty.elements
                ]
            }
        }
    return {
        "Sum": {
            "variants": [
                {"name": _name_to_json(e.name), "algebraic_type": type_to_json(e.ty)} for e in ty.variants
            ]
        }
    }


def describe(ty: AlgebraicType, depth: int = 0) -> str:
    """A short human-readable rendering for error messages (``Option<String>``, ``Identity``)."""
    kind = special_kind(ty)
    if kind == "option":
        assert isinstance(ty, Sum)
        return f"Option<{describe(ty.variants[0].ty, depth + 1)}>"
    if kind == "bytes":
        return "Bytes"
    if kind is not None and kind != "result":
        return {
            "identity": "Identity",
            "connection_id": "ConnectionId",
            "timestamp": "Timestamp",
            "time_duration": "TimeDuration",
            "uuid": "Uuid",
        }[kind]
    if isinstance(ty, Prim):
        return ty.name
    if isinstance(ty, Ref):
        return f"Ref({ty.index})"
    if isinstance(ty, ArrayT):
        return f"Array<{describe(ty.elem, depth + 1)}>"
    if depth > 2:
        return "Product" if isinstance(ty, Product) else "Sum"
    if isinstance(ty, Product):
        inner = ", ".join(f"{e.name or i}: {describe(e.ty, depth + 1)}" for i, e in enumerate(ty.elements))
        return "{" + inner + "}"
    inner = " | ".join(f"{e.name or i}({describe(e.ty, depth + 1)})" for i, e in enumerate(ty.variants))
    return inner or "Never"

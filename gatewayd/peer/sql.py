"""The dev peer's SQL subset: parse, type-check and compile ``SELECT`` statements (sans-IO).

Subscriptions (``Subscribe``), one-off queries and ``POST /sql`` accept::

    SELECT * | t.* FROM table [[AS] t] [WHERE predicate]

``POST /sql`` additionally accepts a column list instead of ``*`` and a trailing ``LIMIT n``
(upstream's one-off SQL is wider than the subscription subset). Joins are refused.

Predicates: comparisons with ``=``, ``!=``/``<>``, ``<``, ``<=``, ``>``, ``>=`` between columns,
literals and the parameter ``:sender`` (the caller's identity), combined with ``AND``/``OR`` and
parentheses; a bare Bool column or ``true``/``false`` is a predicate too. Literals, typed by the
column they meet (as upstream infers them): integers (``-3``, ``1e3``), floats (``1.5``,
``1053e-1``), ``'strings'`` (``''`` escapes a quote), ``true``/``false``, hex (``0xABCD`` or
``X'ABCD'``) for Identity, ConnectionId and bytes; Timestamp columns take an RFC 3339 string or
integer microseconds, Uuid columns a UUID string. ``Option`` columns compare by their inner value;
``None`` matches no comparison. Error texts follow upstream's (``crates/expr/src/errors.rs``).
"""

from __future__ import annotations

import datetime as _dt
import operator
import re
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeAlias

from gatewayd.proto.bsatn import int_bounds
from gatewayd.proto.sats import AlgebraicType, Prim, Sum, describe, special_kind
from gatewayd.proto.schema import ModuleSchema, TableDef

Row: TypeAlias = dict[str, Any]
Predicate: TypeAlias = Callable[[Row], bool]

MAX_SQL_BYTES: Final = 64 * 1024  # generous for any real subscription; bounds the parser's work
MAX_PREDICATE_DEPTH: Final = 64


class SqlError(ValueError):
    """The statement is not in the subset, names something unknown, or does not type-check."""


@dataclass(frozen=True, slots=True)
class Query:
    """One compiled ``SELECT`` over a single table."""

    text: str
    table: str
    predicate: Predicate | None
    columns: tuple[str, ...] | None = None  # a projection (POST /sql only)
    limit: int | None = None

    def matches(self, row: Row) -> bool:
        return self.predicate is None or self.predicate(row)


# --- tokens --------------------------------------------------------------------------------------

_TOKEN_RE: Final = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<hex>0[xX][0-9a-fA-F]*|[xX]'[0-9a-fA-F]*')
  | (?P<num>[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<qident>"(?:[^"]|"")+")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<param>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),.*;])
    """,
    re.VERBOSE,
)
_KEYWORDS: Final = frozenset(
    ("SELECT", "FROM", "WHERE", "AND", "OR", "AS", "LIMIT", "TRUE", "FALSE", "JOIN", "INNER",
     "ON", "NOT", "LEFT", "RIGHT", "CROSS", "ORDER", "GROUP", "BY", "OFFSET")
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # kw, ident, str, num, hex, param, op, punct, end
    value: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise SqlError(f"unexpected character {text[pos]!r} at position {pos}")
        kind = m.lastgroup
        assert kind is not None
        value = m.group()
        if kind == "ident" and value.upper() in _KEYWORDS:
            out.append(_Tok("kw", value.upper(), pos))
        elif kind == "qident":
            out.append(_Tok("ident", value[1:-1].replace('""', '"'), pos))
        elif kind == "str":
            out.append(_Tok("str", value[1:-1].replace("''", "'"), pos))
        elif kind == "hex":
            digits = value[2:] if value[:2] in ("0x", "0X") else value[2:-1]
            out.append(_Tok("hex", digits, pos))
        elif kind != "ws":
            out.append(_Tok(kind, value, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


# --- literals and comparable values --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lit:
    kind: str  # num, str, hex, bool, param
    value: str


@dataclass(frozen=True, slots=True)
class _Col:
    table_alias: str | None
    name: str


_Operand: TypeAlias = _Lit | _Col


def _resolve(schema: ModuleSchema, ty: AlgebraicType) -> AlgebraicType:
    return schema.typespace.resolve(ty)


def _key_fn(schema: ModuleSchema, ty: AlgebraicType) -> Callable[[Any], Any] | None:
    """How to turn a stored value of ``ty`` into something Python compares correctly.

    None when the type has no SQL comparison (arrays, products, non-option sums).
    """
    ty = _resolve(schema, ty)
    kind = special_kind(ty)
    if kind in ("identity", "connection_id"):
        return lambda v: int(v, 16)
    if kind == "bytes":
        return bytes.fromhex
    if kind == "uuid":
        return lambda v: _uuid.UUID(v).int
    if kind in ("timestamp", "time_duration"):
        return lambda v: v
    if kind == "option":
        assert isinstance(ty, Sum)
        inner = _key_fn(schema, ty.variants[0].ty)
        if inner is None:
            return None
        return lambda v: None if v is None else inner(v)
    if isinstance(ty, Prim):
        return lambda v: v
    return None


def _lit_error(lit: _Lit, ty: AlgebraicType) -> SqlError:
    shown = f"'{lit.value}'" if lit.kind == "str" else lit.value
    return SqlError(f"The literal expression `{shown}` cannot be parsed as type `{describe(ty)}`")


def _parse_number(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise SqlError(f"invalid number {text!r}") from None


def _is_integer_literal(text: str) -> bool:
    """INTEGER per the grammar: digits, optionally ``E`` and a non-negative exponent."""
    return re.fullmatch(r"[+-]?[0-9]+(?:[eE]\+?[0-9]+)?", text) is not None


def _coerce(schema: ModuleSchema, lit: _Lit, ty: AlgebraicType, sender: str | None) -> Any:
    """A literal as the comparable key of a value of type ``ty`` (see :func:`_key_fn`)."""
    ty = _resolve(schema, ty)
    kind = special_kind(ty)
    if kind == "option":
        assert isinstance(ty, Sum)
        return _coerce(schema, lit, ty.variants[0].ty, sender)
    if lit.kind == "param":
        if lit.value != ":sender":
            raise SqlError(f"unknown parameter `{lit.value}` (only :sender is supported)")
        if kind != "identity" or sender is None:
            raise _lit_error(lit, ty)
        return int(sender, 16)
    if kind in ("identity", "connection_id"):
        nbytes = 32 if kind == "identity" else 16
        digits = lit.value
        if lit.kind == "str":
            digits = digits[2:] if digits[:2] in ("0x", "0X") else digits
            if not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise _lit_error(lit, ty)
        elif lit.kind != "hex":
            raise _lit_error(lit, ty)
        if not digits or len(digits) > nbytes * 2:
            raise _lit_error(lit, ty)
        return int(digits, 16)
    if kind == "bytes":
        if lit.kind != "hex" or len(lit.value) % 2:
            raise _lit_error(lit, ty)
        return bytes.fromhex(lit.value)
    if kind == "uuid":
        if lit.kind != "str":
            raise _lit_error(lit, ty)
        try:
            return _uuid.UUID(lit.value).int
        except ValueError:
            raise _lit_error(lit, ty) from None
    if kind == "timestamp":
        if lit.kind == "num" and _is_integer_literal(lit.value):
            return int(_parse_number(lit.value))
        if lit.kind == "str":
            try:
                dt = _dt.datetime.fromisoformat(lit.value.replace("Z", "+00:00"))
            except ValueError:
                raise _lit_error(lit, ty) from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=_dt.UTC)
            delta = dt - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
            return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        raise _lit_error(lit, ty)
    if kind == "time_duration":
        if lit.kind == "num" and _is_integer_literal(lit.value):
            return int(_parse_number(lit.value))
        raise _lit_error(lit, ty)
    if not isinstance(ty, Prim):
        raise _lit_error(lit, ty)
    name = ty.name
    if name == "Bool":
        if lit.kind != "bool":
            raise _lit_error(lit, ty)
        return lit.value == "TRUE"
    if name == "String":
        if lit.kind != "str":
            raise _lit_error(lit, ty)
        return lit.value
    if name in ("F32", "F64"):
        if lit.kind != "num":
            raise _lit_error(lit, ty)
        return float(_parse_number(lit.value))
    # integers
    if lit.kind != "num" or not _is_integer_literal(lit.value):
        raise _lit_error(lit, ty)
    v = int(_parse_number(lit.value))
    lo, hi = int_bounds(name)
    if not lo <= v <= hi:
        raise _lit_error(lit, ty)
    return v


_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


# --- parser ----------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, schema: ModuleSchema, sender: str | None) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.schema = schema
        self.sender = sender
        self.table: TableDef | None = None
        self.alias: str | None = None

    # token helpers

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        if t.kind != "end":
            self.i += 1
        return t

    def accept(self, kind: str, value: str | None = None) -> _Tok | None:
        t = self.peek()
        if t.kind == kind and (value is None or t.value == value):
            return self.next()
        return None

    def expect(self, kind: str, value: str | None = None, what: str = "") -> _Tok:
        t = self.accept(kind, value)
        if t is None:
            got = self.peek()
            shown = "end of input" if got.kind == "end" else repr(got.value)
            raise SqlError(f"expected {what or value or kind} at position {got.pos}, got {shown}")
        return t

    # grammar

    def statement(self, allow_projection: bool) -> Query:
        self.expect("kw", "SELECT")
        star = False
        columns: list[str] = []
        star_alias: str | None = None
        if self.accept("punct", "*"):
            star = True
        else:
            first = self.expect("ident", what="`*` or a column")
            if self.accept("punct", "."):
                if self.accept("punct", "*"):
                    star, star_alias = True, first.value
                else:
                    columns.append(self.expect("ident", what="a column").value)
            else:
                columns.append(first.value)
            while not star and self.accept("punct", ","):
                columns.append(self.column_name())
        self.expect("kw", "FROM")
        tname = self.expect("ident", what="a table name").value
        tdef = self.schema.tables.get(tname)
        if tdef is None:
            raise SqlError(f"no such table: `{tname}`. If the table exists, it may be marked private.")
        self.table = tdef
        if self.accept("kw", "AS"):
            self.alias = self.expect("ident", what="an alias").value
        elif self.peek().kind == "ident":
            self.alias = self.next().value
        if self.peek().kind == "kw" and self.peek().value in ("JOIN", "INNER", "LEFT", "RIGHT", "CROSS"):
            raise SqlError("joins are not supported by the dev peer")
        if self.peek().kind == "punct" and self.peek().value == ",":
            raise SqlError("selecting from several tables is not supported")
        if star_alias is not None and star_alias not in (tname, self.alias):
            raise SqlError(f"`{star_alias}` is not in scope")
        predicate = self.predicate(0) if self.accept("kw", "WHERE") else None
        limit: int | None = None
        if self.accept("kw", "LIMIT"):
            tok = self.expect("num", what="a row count")
            if not tok.value.isdigit():
                raise SqlError("LIMIT takes a non-negative integer")
            limit = int(tok.value)
        self.accept("punct", ";")
        end = self.peek()
        if end.kind != "end":
            raise SqlError(f"unexpected {end.value!r} at position {end.pos}")
        if (columns or limit is not None) and not allow_projection:
            if columns:
                raise SqlError(
                    "Column projections are not supported in subscriptions; "
                    "Subscriptions must return a table type"
                )
            raise SqlError("LIMIT is not supported in subscriptions")
        for c in columns:
            if c not in tdef.columns:
                raise SqlError(f"`{tname}` does not have a field `{c}`")
        return Query(self.text, tname, predicate, tuple(columns) or None, limit)

    def column_name(self) -> str:
        first = self.expect("ident", what="a column")
        if self.accept("punct", "."):
            return self.expect("ident", what="a column").value
        return first.value

    def predicate(self, depth: int) -> Predicate:
        if depth > MAX_PREDICATE_DEPTH:
            raise SqlError("the WHERE clause nests too deeply")
        parts = [self.conjunction(depth)]
        while self.accept("kw", "OR"):
            parts.append(self.conjunction(depth))
        if len(parts) == 1:
            return parts[0]
        return lambda row: any(p(row) for p in parts)

    def conjunction(self, depth: int) -> Predicate:
        parts = [self.comparison(depth)]
        while self.accept("kw", "AND"):
            parts.append(self.comparison(depth))
        if len(parts) == 1:
            return parts[0]
        return lambda row: all(p(row) for p in parts)

    def comparison(self, depth: int) -> Predicate:
        if self.accept("punct", "("):
            p = self.predicate(depth + 1)
            self.expect("punct", ")")
            return p
        if self.peek().kind == "kw" and self.peek().value == "NOT":
            raise SqlError("NOT is not supported in the subscription SQL subset")
        left = self.operand()
        op = self.accept("op")
        if op is None:
            return self.bare(left)
        right = self.operand()
        return self.compile_cmp(left, op.value, right)

    def operand(self) -> _Operand:
        t = self.next()
        if t.kind == "ident":
            if self.accept("punct", "."):
                col = self.expect("ident", what="a column")
                if t.value not in (self.table.name if self.table else "", self.alias):
                    raise SqlError(f"`{t.value}` is not in scope")
                return _Col(t.value, col.value)
            return _Col(None, t.value)
        if t.kind == "kw" and t.value in ("TRUE", "FALSE"):
            return _Lit("bool", t.value)
        if t.kind in ("num", "str", "hex", "param"):
            return _Lit(t.kind, t.value)
        shown = "end of input" if t.kind == "end" else repr(t.value)
        raise SqlError(f"expected a column or a literal at position {t.pos}, got {shown}")

    def column(self, col: _Col) -> tuple[str, AlgebraicType]:
        assert self.table is not None
        if col.name not in self.table.columns:
            raise SqlError(f"`{self.table.name}` does not have a field `{col.name}`")
        return col.name, self.table.row_type.elements[self.table.columns.index(col.name)].ty

    def bare(self, operand: _Operand) -> Predicate:
        if isinstance(operand, _Lit):
            if operand.kind != "bool":
                raise SqlError("a WHERE clause must be a boolean expression")
            value = operand.value == "TRUE"
            return lambda _row: value
        name, ty = self.column(operand)
        if _resolve(self.schema, ty) != Prim("Bool"):
            raise SqlError(f"Unexpected type: (expected) Bool != {describe(ty)} (inferred)")
        return lambda row: row[name] is True

    def compile_cmp(self, left: _Operand, op: str, right: _Operand) -> Predicate:
        fn = _OPS[op]
        if isinstance(left, _Col) and isinstance(right, _Col):
            ln, lt = self.column(left)
            rn, rt = self.column(right)
            if _resolve(self.schema, lt) != _resolve(self.schema, rt):
                raise SqlError(f"Unexpected type: (expected) {describe(lt)} != {describe(rt)} (inferred)")
            key = self.key(lt, op)

            def col_col(row: Row) -> bool:
                a, b = key(row[ln]), key(row[rn])
                return a is not None and b is not None and fn(a, b)

            return col_col
        if isinstance(left, _Lit) and isinstance(right, _Lit):
            a, b = self.const(left), self.const(right)
            try:
                value = bool(fn(a, b))
            except TypeError:
                raise SqlError("Cannot resolve type for literal expression") from None
            return lambda _row: value
        if isinstance(left, _Lit):
            assert isinstance(right, _Col)
            # literal op column == column (mirrored op) literal
            mirrored = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
            return self.compile_cmp(right, mirrored, left)
        assert isinstance(left, _Col)
        assert isinstance(right, _Lit)
        name, ty = self.column(left)
        key = self.key(ty, op)
        lit = _coerce(self.schema, right, ty, self.sender)

        def col_lit(row: Row) -> bool:
            v = key(row[name])
            return v is not None and fn(v, lit)

        return col_lit

    def key(self, ty: AlgebraicType, op: str) -> Callable[[Any], Any]:
        key = _key_fn(self.schema, ty)
        if key is None:
            raise SqlError(f"Invalid binary operator `{op}` for type `{describe(ty)}`")
        if op not in ("=", "!=", "<>") and _resolve(self.schema, ty) == Prim("Bool"):
            raise SqlError(f"Invalid binary operator `{op}` for type `Bool`")
        return key

    def const(self, lit: _Lit) -> Any:
        if lit.kind == "num":
            return _parse_number(lit.value)
        if lit.kind == "bool":
            return lit.value == "TRUE"
        if lit.kind == "param":
            if lit.value != ":sender" or self.sender is None:
                raise SqlError(f"unknown parameter `{lit.value}`")
            return int(self.sender, 16)
        if lit.kind == "hex":
            return int(lit.value or "0", 16)
        return lit.value


def parse_query(
    text: str, schema: ModuleSchema, *, sender: str | None = None, allow_projection: bool = False
) -> Query:
    """Parse and type-check one ``SELECT``; raises :class:`SqlError` with a readable reason.

    Args:
        text: the statement (a trailing ``;`` is allowed).
        schema: the database's schema (tables and their column types).
        sender: the caller's identity (64 hex chars), bound to ``:sender``.
        allow_projection: accept a column list and ``LIMIT`` (``POST /sql``).
    """
    if len(text.encode()) > MAX_SQL_BYTES:
        raise SqlError(f"the query is longer than {MAX_SQL_BYTES} bytes")
    try:
        return _Parser(text, schema, sender).statement(allow_projection)
    except RecursionError:
        raise SqlError("the query nests too deeply") from None


def split_statements(text: str) -> list[str]:
    """Split ``POST /sql`` text on ``;`` outside string literals and quoted identifiers."""
    out: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    for ch in text:
        if quote is not None:
            cur.append(ch)
            if ch == quote:
                quote = None  # a doubled quote re-opens on the next char, which is harmless
            continue
        if ch in ("'", '"'):
            quote = ch
            cur.append(ch)
        elif ch == ";":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]

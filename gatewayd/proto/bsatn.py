"""BSATN: SpacetimeDB's binary encoding (PROTOCOL.md §3.1), sans-IO.

Two layers live here:

* :class:`Reader` / :class:`Writer`: bounds-checked primitives used by the message codec. A Reader
  never allocates from a length it read: every declared length is checked against the bytes that are
  actually left before anything is sliced or looped over.

* :class:`ValueCodec`: schema-driven values. ``decode`` turns BSATN into *JSON-ready* values and
  ``encode`` turns JSON-ready values (as a web client would send them) into BSATN, with errors that
  name the field path. The JSON mapping (also documented in docs/values.md):

  ======================  ===========================================================
  type                    JSON-ready value
  ======================  ===========================================================
  Bool                    true / false
  integers                number; beyond +-(2^53-1) a decimal string (exact round trip)
  F32 / F64               number; "NaN", "Infinity", "-Infinity" for non-finite values
  String                  string
  Bytes (Array<U8>)       lowercase hex string, no prefix
  Array<T>                list
  Product                 object keyed by field name (a list if no field has a name)
  Identity                64 lowercase hex chars, big-endian (as SpacetimeDB prints it)
  ConnectionId            32 lowercase hex chars, big-endian
  Timestamp               integer microseconds since the Unix epoch
  TimeDuration            integer microseconds
  Uuid                    canonical "8-4-4-4-12" string
  Option<T>               null or the value (Option<Option<T>>: {"some": v} or null)
  Result<T, E>            {"ok": v} or {"err": e}
  other sums              {"tag": "Variant", "value": v}; unit variants {"tag": "Variant"}
  ======================  ===========================================================

Decoding is the hot path (every row of every update), so ``ValueCodec`` compiles each type into a
small specialised Python function once: consecutive fixed-width fields are read with one
precompiled ``struct`` call, strings are sliced and decoded in place, and nothing is interpreted per
row. When the fast path fails for any reason, the same bytes are decoded again by the interpretive
decoder, which exists to produce the precise error (field path and byte offset).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import struct
import uuid as _uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

from gatewayd.errors import DecodeError, EncodeError, SchemaError
from gatewayd.proto.sats import (
    AlgebraicType,
    ArrayT,
    Prim,
    Product,
    Ref,
    Sum,
    Typespace,
    special_kind,
)

MAX_SAFE_INT: Final = 2**53 - 1
# Arrays of zero-sized elements (units) carry no bytes to check a count against; cap them so a
# hostile count cannot make us loop billions of times. No real schema needs more.
MAX_ZERO_SIZED_ELEMENTS: Final = 65_536
# Encoding recursion cap for JSON input (reducer arguments come from untrusted HTTP bodies).
MAX_ENCODE_DEPTH: Final = 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

_INT_RANGES: Final[dict[str, tuple[int, int, int, bool]]] = {
    # name: (bytes, min, max, signed)
    "U8": (1, 0, 2**8 - 1, False),
    "I8": (1, -(2**7), 2**7 - 1, True),
    "U16": (2, 0, 2**16 - 1, False),
    "I16": (2, -(2**15), 2**15 - 1, True),
    "U32": (4, 0, 2**32 - 1, False),
    "I32": (4, -(2**31), 2**31 - 1, True),
    "U64": (8, 0, 2**64 - 1, False),
    "I64": (8, -(2**63), 2**63 - 1, True),
    "U128": (16, 0, 2**128 - 1, False),
    "I128": (16, -(2**127), 2**127 - 1, True),
    "U256": (32, 0, 2**256 - 1, False),
    "I256": (32, -(2**255), 2**255 - 1, True),
}
_FIXED_SIZE: Final[dict[str, int]] = {
    **{k: v[0] for k, v in _INT_RANGES.items()},
    "Bool": 1,
    "F32": 4,
    "F64": 8,
}


# --- primitives ---------------------------------------------------------------------------------


class Reader:
    """Bounds-checked cursor over ``buf[pos:end]``. Every error is a :class:`DecodeError`."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> int:
        p = self.pos
        if n > self.end - p:
            raise DecodeError(f"truncated: {what} needs {n} bytes, {self.end - p} left", offset=p)
        self.pos = p + n
        return p

    def u8(self) -> int:
        p = self._need(1, "u8")
        return self.buf[p]

    def bool(self) -> bool:
        p = self._need(1, "bool")
        b = self.buf[p]
        if b > 1:
            raise DecodeError(f"invalid bool byte 0x{b:02x} (must be 0 or 1)", offset=p)
        return b == 1

    def u16(self) -> int:
        return int(_U16.unpack_from(self.buf, self._need(2, "u16"))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._need(4, "u32"))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.buf, self._need(8, "u64"))[0])

    def i64(self) -> int:
        return int(_I64.unpack_from(self.buf, self._need(8, "i64"))[0])

    def uint(self, nbytes: int) -> int:
        p = self._need(nbytes, f"u{nbytes * 8}")
        return int.from_bytes(self.buf[p : p + nbytes], "little")

    def raw(self, n: int, what: str = "bytes") -> bytes:
        p = self._need(n, what)
        return self.buf[p : p + n]

    def length(self, what: str) -> int:
        """A u32 length prefix, checked against the bytes left (never trusted to allocate)."""
        p = self.pos
        n = self.u32()
        if n > self.end - self.pos:
            raise DecodeError(
                f"declared {what} length {n} exceeds the {self.end - self.pos} bytes left",
                offset=p,
            )
        return n

    def bytes_(self) -> bytes:
        n = self.length("bytes")
        return self.raw(n)

    def string(self) -> str:
        n = self.length("string")
        p = self._need(n, "string")
        try:
            return self.buf[p : p + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in string: {exc.reason}", offset=p + exc.start) from None

    def array_len(self, min_elem_size: int, what: str = "array") -> int:
        """An array's u32 element count, checked against what the remaining bytes can hold."""
        p = self.pos
        n = self.u32()
        if min_elem_size > 0:
            if n * min_elem_size > self.end - self.pos:
                raise DecodeError(
                    f"declared {what} count {n} cannot fit in the {self.end - self.pos} bytes left",
                    offset=p,
                )
        elif n > MAX_ZERO_SIZED_ELEMENTS:
            raise DecodeError(
                f"{what} of zero-sized elements declares {n} elements (more than {MAX_ZERO_SIZED_ELEMENTS})",
                offset=p,
            )
        return n


class Writer:
    """Appends BSATN to a bytearray."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = bytearray()

    def u8(self, v: int) -> None:
        self.out.append(v)

    def bool(self, v: bool) -> None:
        self.out.append(1 if v else 0)

    def u16(self, v: int) -> None:
        self.out += _U16.pack(v)

    def u32(self, v: int) -> None:
        self.out += _U32.pack(v)

    def u64(self, v: int) -> None:
        self.out += _U64.pack(v)

    def i64(self, v: int) -> None:
        self.out += _I64.pack(v)

    def uint(self, v: int, nbytes: int) -> None:
        self.out += v.to_bytes(nbytes, "little")

    def raw(self, b: bytes) -> None:
        self.out += b

    def bytes_(self, b: bytes) -> None:
        self.out += _U32.pack(len(b))
        self.out += b

    def string(self, s: str) -> None:
        self.bytes_(s.encode("utf-8"))

    def getvalue(self) -> bytes:
        return bytes(self.out)


# --- JSON-ready helpers shared by both decoders --------------------------------------------------


def safe_int(v: int) -> int | str:
    return v if -MAX_SAFE_INT <= v <= MAX_SAFE_INT else str(v)


def json_float(v: float) -> float | str:
    if v - v == 0:  # finite (inf - inf and nan - nan are nan)
        return v
    if v != v:
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def identity_hex(le: bytes) -> str:
    """Identity/ConnectionId BSATN bytes (little-endian) to SpacetimeDB's big-endian hex."""
    return le[::-1].hex()


def uuid_str(le: bytes) -> str:
    return str(_uuid.UUID(int=int.from_bytes(le, "little")))


def _min_size(ts: Typespace, ty: AlgebraicType, visiting: frozenset[int] = frozenset()) -> int:
    """A lower bound on the BSATN size of any value of ``ty`` (used to sanity-check counts)."""
    if isinstance(ty, Ref):
        if ty.index in visiting:
            return 0
        return _min_size(ts, ts.resolve(ty), visiting | {ty.index})
    if isinstance(ty, Prim):
        return 4 if ty.name == "String" else _FIXED_SIZE[ty.name]
    if isinstance(ty, ArrayT):
        return 4
    if isinstance(ty, Product):
        return sum(_min_size(ts, e.ty, visiting) for e in ty.elements)
    return 1  # a sum's tag


def _fixed_size(ts: Typespace, ty: AlgebraicType, depth: int = 0) -> int | None:
    """The exact BSATN size of ``ty`` if every value has the same size, else None."""
    if depth > 32:
        return None
    ty = ts.resolve(ty)
    if isinstance(ty, Prim):
        return _FIXED_SIZE.get(ty.name)
    if isinstance(ty, Product):
        total = 0
        for e in ty.elements:
            s = _fixed_size(ts, e.ty, depth + 1)
            if s is None:
                return None
            total += s
        return total
    return None


# --- the interpretive decoder (precise errors; also the reference for the compiled one) ----------


def _slow_decode(ts: Typespace, ty: AlgebraicType, r: Reader, path: str, safe: bool, depth: int = 0) -> Any:
    try:
        return _slow_decode_inner(ts, ty, r, path, safe, depth)
    except DecodeError as exc:
        if exc.path:
            raise
        raise DecodeError(exc.reason, path=path, offset=exc.offset) from None


def _slow_decode_inner(ts: Typespace, ty: AlgebraicType, r: Reader, path: str, safe: bool, depth: int) -> Any:
    if depth > 256:
        raise DecodeError("value nests deeper than 256 levels", path=path, offset=r.pos)
    ty = ts.resolve(ty)
    kind = special_kind(ty)
    if isinstance(ty, Prim):
        name = ty.name
        if name == "Bool":
            return r.bool()
        if name == "String":
            return r.string()
        if name == "F32":
            v = struct.unpack("<f", r.raw(4, "f32"))[0]
            return json_float(v) if safe else v
        if name == "F64":
            v = struct.unpack("<d", r.raw(8, "f64"))[0]
            return json_float(v) if safe else v
        size, _lo, _hi, signed = _INT_RANGES[name]
        v = int.from_bytes(r.raw(size, name.lower()), "little", signed=signed)
        return safe_int(v) if safe else v
    if kind == "identity":
        return identity_hex(r.raw(32, "Identity"))
    if kind == "connection_id":
        return identity_hex(r.raw(16, "ConnectionId"))
    if kind in ("timestamp", "time_duration"):
        v = r.i64()
        return safe_int(v) if safe else v
    if kind == "uuid":
        return uuid_str(r.raw(16, "Uuid"))
    if kind == "bytes":
        return r.bytes_().hex()
    if isinstance(ty, ArrayT):
        n = r.array_len(_min_size(ts, ty.elem), "array")
        return [_slow_decode(ts, ty.elem, r, f"{path}[{i}]", safe, depth + 1) for i in range(n)]
    if isinstance(ty, Product):
        if ty.elements and all(e.name is None for e in ty.elements):
            return [
                _slow_decode(ts, e.ty, r, f"{path}[{i}]", safe, depth + 1) for i, e in enumerate(ty.elements)
            ]
        return {
            (e.name if e.name is not None else str(i)): _slow_decode(
                ts, e.ty, r, f"{path}.{e.name if e.name is not None else i}", safe, depth + 1
            )
            for i, e in enumerate(ty.elements)
        }
    assert isinstance(ty, Sum)
    p = r.pos
    tag = r.u8()
    if tag >= len(ty.variants):
        raise DecodeError(
            f"unknown sum tag {tag} (type has {len(ty.variants)} variants)", path=path, offset=p
        )
    var = ty.variants[tag]
    vname = var.name if var.name is not None else str(tag)
    inner = _slow_decode(ts, var.ty, r, f"{path}<{vname}>", safe, depth + 1)
    if kind == "option":
        if tag == 1:
            return None
        return {"some": inner} if special_kind(ts.resolve(var.ty)) == "option" else inner
    if kind == "result":
        return {vname: inner}
    rv = ts.resolve(var.ty)
    if isinstance(rv, Product) and not rv.elements:
        return {"tag": vname}
    return {"tag": vname, "value": inner}


# --- the compiled decoder ------------------------------------------------------------------------

DecodeFn = Callable[[bytes, int, int], tuple[Any, int]]
# fn(buf, pos, end, append_value, append_raw) -> pos: see _Compiler.build_rows.
RowsFn = Callable[[bytes, int, int, Callable[[Any], None], Callable[[bytes], None]], int]

_STRUCT_FMT: Final[dict[str, str]] = {
    "Bool": "B", "U8": "B", "I8": "b", "U16": "H", "I16": "h", "U32": "I", "I32": "i",
    "U64": "Q", "I64": "q", "F32": "f", "F64": "d",
    "U128": "16s", "I128": "16s", "U256": "32s", "I256": "32s",
}  # fmt: skip


class _FastFail(Exception):
    """Raised inside compiled code; the caller re-decodes with the slow path for the message."""


def _big(signed: bool, safe: bool) -> Callable[[bytes], int | str]:
    if safe:
        return lambda b: safe_int(int.from_bytes(b, "little", signed=signed))
    return lambda b: int.from_bytes(b, "little", signed=signed)


class _Compiler:
    """Generates one Python function per composite type. See the module docstring for why."""

    def __init__(self, ts: Typespace, safe: bool) -> None:
        self.ts = ts
        self.safe = safe
        self.ns: dict[str, Any] = {
            "_FastFail": _FastFail,
            "_U32": _U32.unpack_from,
            "_json_float": json_float,
            "_uuid": uuid_str,
            "_u128": _big(False, safe),
            "_i128": _big(True, safe),
            "_u256": _big(False, safe),
            "_i256": _big(True, safe),
            "str": str,
        }
        self.names: dict[AlgebraicType, str] = {}
        self.structs: dict[str, str] = {}
        self.sources: list[str] = []
        self.counter = 0

    def _fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _struct(self, fmt: str) -> str:
        name = self.structs.get(fmt)
        if name is None:
            name = f"_S{len(self.structs)}"
            self.structs[fmt] = name
            self.ns[name] = struct.Struct("<" + fmt).unpack_from
        return name

    def func(self, ty: AlgebraicType) -> str:
        ty = self.ts.resolve(ty)
        name = self.names.get(ty)
        if name is not None:
            return name
        name = self._fresh("_d")
        self.names[ty] = name
        lines: list[str] = []
        self.emit(ty, "v", lines, "    ")
        self.sources.append(f"def {name}(buf, pos, end):\n" + "\n".join(lines) + "\n    return v, pos\n")
        return name

    def build(self, ty: AlgebraicType) -> DecodeFn:
        name = self.func(ty)
        exec(compile("\n".join(self.sources), "<bsatn-compiled>", "exec"), self.ns)
        fn: DecodeFn = self.ns[name]
        return fn

    # Fixed-width leaves: (struct format, expression over the raw unpacked variable, needs check)
    def leaf(self, ty: AlgebraicType) -> tuple[str, str, bool] | None:
        ty = self.ts.resolve(ty)
        safe = self.safe
        if isinstance(ty, Prim):
            n = ty.name
            if n == "String":
                return None
            fmt = _STRUCT_FMT[n]
            if n == "Bool":
                return fmt, "({x} == 1)", True
            if n == "U64":
                return (
                    fmt,
                    ("({x} if {x} <= 9007199254740991 else str({x}))" if safe else "{x}"),
                    False,
                )
            if n == "I64":
                return (
                    fmt,
                    (
                        "({x} if -9007199254740991 <= {x} <= 9007199254740991 else str({x}))"
                        if safe
                        else "{x}"
                    ),
                    False,
                )
            if n in ("F32", "F64"):
                return (
                    fmt,
                    ("({x} if {x} - {x} == 0 else _json_float({x}))" if safe else "{x}"),
                    False,
                )
            if n in ("U128", "I128", "U256", "I256"):
                return fmt, f"_{n.lower()}({{x}})", False
            return fmt, "{x}", False
        kind = special_kind(ty)
        if kind == "identity":
            return "32s", "{x}[::-1].hex()", False
        if kind == "connection_id":
            return "16s", "{x}[::-1].hex()", False
        if kind in ("timestamp", "time_duration"):
            return self.leaf(Prim("I64"))
        if kind == "uuid":
            return "16s", "_uuid({x})", False
        return None

    def emit(self, ty: AlgebraicType, target: str, lines: list[str], ind: str) -> None:
        """Emit statements that decode ``ty`` at ``pos`` into ``target`` and advance ``pos``."""
        ty = self.ts.resolve(ty)
        leaf = self.leaf(ty)
        if leaf is not None:
            fmt, expr, check = leaf
            x = self._fresh("x")
            s = self._struct(fmt)
            lines.append(f"{ind}{x}, = {s}(buf, pos)")
            lines.append(f"{ind}pos += {struct.calcsize('<' + fmt)}")
            if check:
                lines.append(f"{ind}if {x} > 1: raise _FastFail")
            lines.append(f"{ind}{target} = {expr.format(x=x)}")
            return
        kind = special_kind(ty)
        if (isinstance(ty, Prim) and ty.name == "String") or kind == "bytes":
            n, e = self._fresh("n"), self._fresh("e")
            lines.append(f"{ind}{n}, = _U32(buf, pos)")
            lines.append(f"{ind}pos += 4")
            lines.append(f"{ind}{e} = pos + {n}")
            lines.append(f"{ind}if {e} > end: raise _FastFail")
            conv = ".decode()" if kind is None else ".hex()"
            lines.append(f"{ind}{target} = buf[pos:{e}]{conv}")
            lines.append(f"{ind}pos = {e}")
            return
        if isinstance(ty, Product):
            self.emit_product(ty, target, lines, ind)
            return
        if isinstance(ty, ArrayT):
            n, acc, item = self._fresh("n"), self._fresh("a"), self._fresh("i")
            min_size = _min_size(self.ts, ty.elem)
            lines.append(f"{ind}{n}, = _U32(buf, pos)")
            lines.append(f"{ind}pos += 4")
            if min_size > 0:
                lines.append(f"{ind}if {n} * {min_size} > end - pos: raise _FastFail")
            else:
                lines.append(f"{ind}if {n} > {MAX_ZERO_SIZED_ELEMENTS}: raise _FastFail")
            lines.append(f"{ind}{acc} = []")
            lines.append(f"{ind}for _ in range({n}):")
            self.emit_nested(ty.elem, item, lines, ind + "    ")
            lines.append(f"{ind}    {acc}.append({item})")
            lines.append(f"{ind}{target} = {acc}")
            return
        assert isinstance(ty, Sum)
        tag = self._fresh("t")
        lines.append(f"{ind}if pos >= end: raise _FastFail")
        lines.append(f"{ind}{tag} = buf[pos]")
        lines.append(f"{ind}pos += 1")
        for i, var in enumerate(ty.variants):
            lines.append(f"{ind}{'if' if i == 0 else 'elif'} {tag} == {i}:")
            vname = var.name if var.name is not None else str(i)
            rv = self.ts.resolve(var.ty)
            inner = self._fresh("u")
            is_unit = isinstance(rv, Product) and not rv.elements
            if not is_unit:
                self.emit_nested(var.ty, inner, lines, ind + "    ")
            if kind == "option":
                if i == 1:
                    lines.append(f"{ind}    {target} = None")
                elif special_kind(rv) == "option":
                    lines.append(f"{ind}    {target} = {{'some': {inner}}}")
                else:
                    lines.append(f"{ind}    {target} = {inner}")
            elif kind == "result":
                lines.append(f"{ind}    {target} = {{{vname!r}: {inner if not is_unit else '{}'}}}")
            elif is_unit:
                lines.append(f"{ind}    {target} = {{'tag': {vname!r}}}")
            else:
                lines.append(f"{ind}    {target} = {{'tag': {vname!r}, 'value': {inner}}}")
        if not ty.variants:
            lines.append(f"{ind}raise _FastFail")
        else:
            lines.append(f"{ind}else: raise _FastFail")

    def emit_nested(self, ty: AlgebraicType, target: str, lines: list[str], ind: str) -> None:
        """Leaves and strings inline; composite types through their own function (linear code)."""
        r = self.ts.resolve(ty)
        if (
            self.leaf(r) is not None
            or (isinstance(r, Prim) and r.name == "String")
            or special_kind(r) == "bytes"
        ):
            self.emit(r, target, lines, ind)
        else:
            fn = self.func(r)
            lines.append(f"{ind}{target}, pos = {fn}(buf, pos, end)")

    def emit_product(self, ty: Product, target: str, lines: list[str], ind: str) -> None:
        names = [e.name if e.name is not None else str(i) for i, e in enumerate(ty.elements)]
        as_list = bool(ty.elements) and all(e.name is None for e in ty.elements)
        values: list[str] = []
        # Group runs of fixed-width leaves into one struct call. The u32 length prefix of a string
        # or bytes field joins the run before it, so e.g. "u64, Identity, String" is one call.
        group: list[tuple[str, str, bool]] = []

        def flush(length: str | None = None) -> None:
            if not group and length is None:
                return
            fmt = "".join(g[0] for g in group) + ("I" if length is not None else "")
            xs = [self._fresh("x") for _ in group]
            targets = xs if length is None else [*xs, length]
            lines.append(f"{ind}{', '.join(targets)}, = {self._struct(fmt)}(buf, pos)")
            lines.append(f"{ind}pos += {struct.calcsize('<' + fmt)}")
            for x, (_fmt, expr, check) in zip(xs, group, strict=True):
                if check:
                    lines.append(f"{ind}if {x} > 1: raise _FastFail")
                values.append(expr.format(x=x))
            group.clear()

        for e in ty.elements:
            leaf = self.leaf(e.ty)
            if leaf is not None:
                group.append(leaf)
                continue
            r = self.ts.resolve(e.ty)
            kind = special_kind(r)
            if (isinstance(r, Prim) and r.name == "String") or kind == "bytes":
                n, stop, v = self._fresh("n"), self._fresh("e"), self._fresh("f")
                flush(length=n)
                lines.append(f"{ind}{stop} = pos + {n}")
                lines.append(f"{ind}if {stop} > end: raise _FastFail")
                lines.append(f"{ind}{v} = buf[pos:{stop}]{'.hex()' if kind == 'bytes' else '.decode()'}")
                lines.append(f"{ind}pos = {stop}")
                values.append(v)
                continue
            flush()
            v = self._fresh("f")
            self.emit_nested(e.ty, v, lines, ind)
            values.append(v)
        flush()
        if as_list:
            lines.append(f"{ind}{target} = [{', '.join(values)}]")
        else:
            items = ", ".join(f"{n!r}: {v}" for n, v in zip(names, values, strict=True))
            lines.append(f"{ind}{target} = {{{items}}}")

    def build_rows(self, ty: AlgebraicType) -> RowsFn:
        """The loop of :meth:`ValueCodec.decode_rows` as one function, with the row type's body
        inlined: no call, tuple or unpacking per row. ``fn(buf, pos, end, append_value,
        append_raw) -> pos`` decodes rows back to back while ``pos < end``."""
        r = self.ts.resolve(ty)
        lines: list[str] = []
        ind = " " * 8
        if isinstance(r, Product):
            self.emit_product(r, "v", lines, ind)
        else:
            self.emit_nested(r, "v", lines, ind)
        if _min_size(self.ts, r) == 0:
            # A row may be zero bytes long: stop rather than loop forever without advancing.
            lines.append(f"{ind}if pos == start: raise _FastFail")
        name = self._fresh("_rows")
        self.sources.append(
            f"def {name}(buf, pos, end, append_v, append_r):\n"
            "    while pos < end:\n"
            "        start = pos\n" + "\n".join(lines) + "\n"
            "        append_v(v)\n"
            "        append_r(buf[start:pos])\n"
            "    return pos\n"
        )
        exec(compile("\n".join(self.sources), "<bsatn-compiled>", "exec"), self.ns)
        fn: RowsFn = self.ns[name]
        return fn


# --- the encoder (JSON-ready value -> BSATN) ------------------------------------------------------

_DECIMAL_RE: Final = re.compile(r"-?[0-9]{1,80}")
_HEX_RE: Final = re.compile(r"(?:0x)?((?:[0-9a-fA-F]{2})*)")


def _parse_int(v: Any, name: str, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise EncodeError(f"expected an integer ({name}), got {_jtype(v)}", path=path)
    if isinstance(v, str):
        if not _DECIMAL_RE.fullmatch(v):
            raise EncodeError(f"expected an integer ({name}) or a decimal string, got {v!r:.40}", path=path)
        v = int(v)
    n: int = v
    _size, lo, hi, _signed = _INT_RANGES[name]
    if not lo <= n <= hi:
        raise EncodeError(f"{n} is out of range for {name} [{lo}, {hi}]", path=path)
    return n


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, Mapping):
        return "an object"
    return type(v).__name__


def _parse_hex(v: Any, nbytes: int | None, what: str, path: str) -> bytes:
    if not isinstance(v, str):
        raise EncodeError(f"expected {what} as a hex string, got {_jtype(v)}", path=path)
    m = _HEX_RE.fullmatch(v)
    if m is None:
        raise EncodeError(f"expected {what} as a hex string, got {v!r:.80}", path=path)
    raw = bytes.fromhex(m.group(1))
    if nbytes is not None and len(raw) != nbytes:
        raise EncodeError(f"expected {what} as {nbytes * 2} hex chars, got {len(raw) * 2}", path=path)
    return raw


def _parse_timestamp(v: Any, path: str) -> int:
    if isinstance(v, str) and ("T" in v or (len(v) > 4 and v[4] == "-")):
        try:
            dt = _dt.datetime.fromisoformat(v)
        except ValueError:
            raise EncodeError(f"invalid ISO-8601 timestamp {v!r:.60}", path=path) from None
        if dt.tzinfo is None:
            raise EncodeError("an ISO-8601 timestamp needs a timezone (e.g. 'Z')", path=path)
        delta = dt - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return _parse_int(v, "I64", path)


class ValueCodec:
    """Schema-driven BSATN codec for one typespace.

    ``safe=True`` (the default) yields JSON-ready values (big integers as strings, non-finite floats
    as strings). ``safe=False`` keeps Python ints and floats, for code that compares values (the
    dev peer's SQL filter).
    """

    def __init__(self, typespace: Typespace | None = None, *, safe: bool = True) -> None:
        self.typespace = typespace if typespace is not None else Typespace()
        self.safe = safe
        self._decoders: dict[AlgebraicType, DecodeFn] = {}
        self._row_decoders: dict[AlgebraicType, RowsFn] = {}

    # decoding

    def decoder(self, ty: AlgebraicType) -> DecodeFn:
        """The compiled decode function for ``ty``: ``fn(buf, pos, len(buf)) -> (value, new_pos)``.

        It raises arbitrary exceptions on bad input; use :meth:`decode`/:meth:`decode_rows` unless
        you handle that (they translate to :class:`DecodeError`).
        """
        fn = self._decoders.get(ty)
        if fn is None:
            try:
                fn = _Compiler(self.typespace, self.safe).build(ty)
            except RecursionError:
                raise SchemaError("type is too deeply nested to compile") from None
            self._decoders[ty] = fn
        return fn

    def decode(self, ty: AlgebraicType, buf: bytes, *, path: str = "value") -> Any:
        """Decode exactly one value filling ``buf``."""
        fn = self.decoder(ty)
        try:
            value, pos = fn(buf, 0, len(buf))
        except Exception:
            value = self.decode_slow(ty, buf, path=path)
            pos = len(buf)
        if pos != len(buf):
            raise DecodeError(f"{len(buf) - pos} trailing bytes after the value", path=path, offset=pos)
        return value

    def decode_slow(self, ty: AlgebraicType, buf: bytes, *, path: str = "value") -> Any:
        """The interpretive decoder: same result as :meth:`decode`, precise errors, slower."""
        r = Reader(buf)
        try:
            value = _slow_decode(self.typespace, ty, r, path, self.safe)
        except RecursionError:
            raise DecodeError("value nests too deeply", path=path) from None
        except SchemaError as exc:
            raise DecodeError(f"schema problem: {exc}", path=path) from None
        if r.remaining():
            raise DecodeError(f"{r.remaining()} trailing bytes after the value", path=path, offset=r.pos)
        return value

    def decode_rows(
        self, ty: AlgebraicType, data: bytes, *, path: str = "row"
    ) -> tuple[list[Any], list[bytes]]:
        """Decode concatenated rows (a BsatnRowList's data); returns (values, raw row bytes).

        Rows are read one after another until the data is used up (as the TS SDK does), so the
        size hint is not needed here.
        """
        fn = self._row_decoders.get(ty)
        if fn is None:
            try:
                fn = _Compiler(self.typespace, self.safe).build_rows(ty)
            except RecursionError:
                raise SchemaError("type is too deeply nested to compile") from None
            self._row_decoders[ty] = fn
        values: list[Any] = []
        raws: list[bytes] = []
        end = len(data)
        try:
            pos = fn(data, 0, end, values.append, raws.append)
        except Exception:
            # Re-decode the failing row slowly for a precise message. Rows are only appended once
            # fully decoded, so the failing one starts right after the raw rows we have.
            pos = sum(map(len, raws))
            where = f"{path}[{len(values)}]"
            r = Reader(data, pos)
            try:
                _slow_decode(self.typespace, ty, r, where, self.safe)
            except DecodeError:
                raise
            except (RecursionError, SchemaError) as exc:
                raise DecodeError(f"cannot decode row: {exc}", path=where) from None
            if r.pos == pos:
                raise DecodeError(
                    "a row of this type can be zero bytes long, so rows cannot be split "
                    "without the size hint",
                    path=where,
                    offset=pos,
                ) from None
            raise DecodeError(
                "row decoding failed on the fast path but not the slow one", path=path, offset=pos
            ) from None
        if pos != end:
            raise DecodeError("last row runs past the end of the row data", path=path, offset=end)
        return values, raws

    # encoding

    def encode(self, ty: AlgebraicType, value: Any, *, path: str = "value") -> bytes:
        """Encode a JSON-ready value as ``ty``; :class:`EncodeError` names the offending field."""
        out = bytearray()
        try:
            self._encode(ty, value, out, path, 0)
        except RecursionError:
            raise EncodeError("value nests too deeply", path=path) from None
        return bytes(out)

    def _encode(self, ty: AlgebraicType, v: Any, out: bytearray, path: str, depth: int) -> None:
        if depth > MAX_ENCODE_DEPTH:
            raise EncodeError(f"value nests deeper than {MAX_ENCODE_DEPTH} levels", path=path)
        ty = self.typespace.resolve(ty)
        kind = special_kind(ty)
        if isinstance(ty, Prim):
            name = ty.name
            if name == "Bool":
                if not isinstance(v, bool):
                    raise EncodeError(f"expected a boolean, got {_jtype(v)}", path=path)
                out.append(1 if v else 0)
            elif name == "String":
                if not isinstance(v, str):
                    raise EncodeError(f"expected a string, got {_jtype(v)}", path=path)
                try:
                    b = v.encode("utf-8")
                except UnicodeEncodeError:
                    raise EncodeError("string is not valid Unicode (lone surrogate)", path=path) from None
                out += _U32.pack(len(b))
                out += b
            elif name in ("F32", "F64"):
                out += struct.pack("<f" if name == "F32" else "<d", self._float(v, name, path))
            else:
                size, _lo, _hi, signed = _INT_RANGES[name]
                out += _parse_int(v, name, path).to_bytes(size, "little", signed=signed)
            return
        if kind == "identity":
            out += _parse_hex(v, 32, "an Identity (64 hex chars)", path)[::-1]
            return
        if kind == "connection_id":
            out += _parse_hex(v, 16, "a ConnectionId (32 hex chars)", path)[::-1]
            return
        if kind == "timestamp":
            out += _I64.pack(self._in_i64(_parse_timestamp(v, path), path))
            return
        if kind == "time_duration":
            out += _I64.pack(_parse_int(v, "I64", path))
            return
        if kind == "uuid":
            if isinstance(v, str):
                try:
                    u = _uuid.UUID(v)
                except ValueError:
                    raise EncodeError(f"invalid UUID {v!r:.60}", path=path) from None
                out += u.int.to_bytes(16, "little")
            else:
                out += _parse_int(v, "U128", path).to_bytes(16, "little")
            return
        if kind == "bytes" and isinstance(v, str):
            raw = _parse_hex(v, None, "bytes", path)
            out += _U32.pack(len(raw))
            out += raw
            return
        if isinstance(ty, ArrayT):
            if not isinstance(v, list | tuple):
                raise EncodeError(f"expected an array, got {_jtype(v)}", path=path)
            out += _U32.pack(len(v))
            for i, item in enumerate(v):
                self._encode(ty.elem, item, out, f"{path}[{i}]", depth + 1)
            return
        if isinstance(ty, Product):
            self._encode_product(ty, v, out, path, depth)
            return
        assert isinstance(ty, Sum)
        self._encode_sum(ty, kind, v, out, path, depth)

    def _in_i64(self, v: int, path: str) -> int:
        if not -(2**63) <= v < 2**63:
            raise EncodeError("timestamp out of range for i64 microseconds", path=path)
        return v

    def _float(self, v: Any, name: str, path: str) -> float:
        if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):
            return float(v.lower().replace("infinity", "inf"))
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise EncodeError(f"expected a number ({name}), got {_jtype(v)}", path=path)
        f = float(v)
        if name == "F32" and math.isfinite(f) and abs(f) > 3.4028234663852886e38:
            raise EncodeError(f"{v} is out of range for F32", path=path)
        return f

    def _encode_product(self, ty: Product, v: Any, out: bytearray, path: str, depth: int) -> None:
        elems = ty.elements
        if isinstance(v, list | tuple):
            if len(v) != len(elems):
                raise EncodeError(f"expected {len(elems)} elements, got {len(v)}", path=path)
            for i, (e, item) in enumerate(zip(elems, v, strict=True)):
                self._encode(e.ty, item, out, f"{path}[{i}]", depth + 1)
            return
        if not isinstance(v, Mapping):
            raise EncodeError(f"expected an object, got {_jtype(v)}", path=path)
        names = [e.name if e.name is not None else str(i) for i, e in enumerate(elems)]
        unknown = [k for k in v if k not in names]
        if unknown:
            raise EncodeError(
                f"unknown field {unknown[0]!r} (expected {', '.join(names) or 'no fields'})",
                path=path,
            )
        for name, e in zip(names, elems, strict=True):
            sub = f"{path}.{name}"
            if name in v:
                self._encode(e.ty, v[name], out, sub, depth + 1)
            elif special_kind(self.typespace.resolve(e.ty)) == "option":
                out.append(1)  # a missing optional field is None
            else:
                raise EncodeError("missing required field", path=sub)

    def _encode_sum(self, ty: Sum, kind: str | None, v: Any, out: bytearray, path: str, depth: int) -> None:
        variants = ty.variants
        if kind == "option":
            inner_is_option = special_kind(self.typespace.resolve(variants[0].ty)) == "option"
            if v is None:
                out.append(1)
                return
            if inner_is_option:
                if not (isinstance(v, Mapping) and set(v) == {"some"}):
                    raise EncodeError('nested Option needs {"some": value} or null', path=path)
                v = v["some"]
            out.append(0)
            self._encode(variants[0].ty, v, out, f"{path}<some>", depth + 1)
            return
        names = [e.name if e.name is not None else str(i) for i, e in enumerate(variants)]
        tag: int
        payload: Any
        if isinstance(v, str):
            if v not in names:
                raise EncodeError(f"unknown variant {v!r} (expected one of {', '.join(names)})", path=path)
            tag, payload = names.index(v), {}
        elif isinstance(v, Mapping) and "tag" in v and set(v) <= {"tag", "value"}:
            name = v["tag"]
            if not isinstance(name, str) or name not in names:
                raise EncodeError(
                    f"unknown variant {name!r:.40} (expected one of {', '.join(names)})", path=path
                )
            tag, payload = names.index(name), v.get("value", {})
        elif isinstance(v, Mapping) and len(v) == 1:
            ((name, payload),) = v.items()
            if name not in names:
                raise EncodeError(
                    f"unknown variant {name!r:.40} (expected one of {', '.join(names)})", path=path
                )
            tag = names.index(name)
        else:
            raise EncodeError(
                f'expected a variant as {{"tag": name, "value": v}}, got {_jtype(v)}', path=path
            )
        var_ty = self.typespace.resolve(variants[tag].ty)
        out.append(tag)
        if isinstance(var_ty, Product) and not var_ty.elements:
            if payload not in ({}, [], None):
                raise EncodeError(f"variant {names[tag]!r} takes no value", path=path)
            return
        self._encode(var_ty, payload, out, f"{path}<{names[tag]}>", depth + 1)


def fixed_row_size(ts: Typespace, ty: AlgebraicType) -> int | None:
    """The exact encoded size of every value of ``ty``, if constant (for FixedSize row hints)."""
    try:
        return _fixed_size(ts, ty)
    except SchemaError:
        return None


def int_bounds(name: str) -> tuple[int, int]:
    """The inclusive ``(min, max)`` of a SATS integer type name (``"U8"`` ... ``"I256"``)."""
    _size, lo, hi, _signed = _INT_RANGES[name]
    return lo, hi

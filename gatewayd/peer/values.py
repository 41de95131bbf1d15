"""Value conversions at the peer's HTTP edge: SATS-JSON in (``/call``), typeless JSON out (``/sql``).

Inside the peer, values are the codec's JSON-ready forms with exact ints (``ValueCodec(safe=False)``,
see :mod:`gatewayd.peer.module`). Two other JSON dialects meet the HTTP API:

* ``POST /call/{reducer}`` takes arguments in **SATS-JSON** (what the ``spacetime`` CLI and
  upstream clients send): ``{"__identity__": "0x…"}``, ``{"some": v}``/``{"none": []}``,
  ``{"Variant": v}``, a product as an object or a positional array. :func:`from_sats_json`
  accepts that *and* the JSON-ready forms, so the same body works either way.
* ``POST /sql`` returns rows **serialised without their type** (PROTOCOL.md §2.4): products as
  arrays (an Identity is ``["0x…"]``), sums as ``[tag, value]``, bytes as hex.
"""

from __future__ import annotations

import math
import uuid as _uuid
from collections.abc import Mapping
from typing import Any

from gatewayd.proto.sats import AlgebraicType, ArrayT, Prim, Product, Sum, Typespace, special_kind

_SPECIAL_FIELDS = {
    "identity": "__identity__",
    "connection_id": "__connection_id__",
    "timestamp": "__timestamp_micros_since_unix_epoch__",
    "time_duration": "__time_duration_micros__",
    "uuid": "__uuid__",
}


def from_sats_json(ts: Typespace, ty: AlgebraicType, v: Any, depth: int = 0) -> Any:
    """SATS-JSON (or JSON-ready) -> a JSON-ready value the codec encodes; lenient, never raises.

    Anything not recognised is passed through unchanged, so the codec's encoder reports the
    precise error with the field path.
    """
    if depth > 64:
        return v
    ty = ts.resolve(ty)
    kind = special_kind(ty)
    if kind in _SPECIAL_FIELDS:
        field_name = _SPECIAL_FIELDS[kind]
        if isinstance(v, Mapping) and set(v) == {field_name}:
            v = v[field_name]
        elif isinstance(v, list) and len(v) == 1:
            v = v[0]
        if kind in ("identity", "connection_id") and isinstance(v, int) and not isinstance(v, bool):
            return format(v, "064x" if kind == "identity" else "032x")
        if kind in ("identity", "connection_id") and isinstance(v, str):
            return v[2:] if v[:2] in ("0x", "0X") else v
        return v
    if kind == "option":
        assert isinstance(ty, Sum)
        if isinstance(v, Mapping) and len(v) == 1:
            ((k, inner),) = v.items()
            if k == "none":
                return None
            if k == "some":
                inner_ty = ts.resolve(ty.variants[0].ty)
                value = from_sats_json(ts, inner_ty, inner, depth + 1)
                return {"some": value} if special_kind(inner_ty) == "option" else value
        return v if v is None else from_sats_json(ts, ty.variants[0].ty, v, depth + 1)
    if kind == "bytes":
        return v
    if isinstance(ty, ArrayT):
        if isinstance(v, list):
            return [from_sats_json(ts, ty.elem, x, depth + 1) for x in v]
        return v
    if isinstance(ty, Product):
        if isinstance(v, list) and len(v) == len(ty.elements):
            return [from_sats_json(ts, e.ty, x, depth + 1) for e, x in zip(ty.elements, v, strict=True)]
        if isinstance(v, Mapping):
            by_name = {e.name: e.ty for e in ty.elements if e.name is not None}
            return {
                k: from_sats_json(ts, by_name[k], x, depth + 1) if k in by_name else x for k, x in v.items()
            }
        return v
    if isinstance(ty, Sum) and isinstance(v, Mapping) and len(v) == 1 and "tag" not in v:
        ((k, inner),) = v.items()
        for var in ty.variants:
            if var.name == k:
                return {"tag": k, "value": from_sats_json(ts, var.ty, inner, depth + 1)}
    return v


def to_sql_json(ts: Typespace, ty: AlgebraicType, v: Any, depth: int = 0) -> Any:
    """A native (exact) value -> upstream's typeless JSON of ``POST /sql`` rows."""
    ty = ts.resolve(ty)
    kind = special_kind(ty)
    if kind == "identity":
        return ["0x" + v]
    if kind == "connection_id":
        return [int(v, 16)]
    if kind in ("timestamp", "time_duration"):
        return [v]
    if kind == "uuid":
        return [_uuid.UUID(v).int]
    if kind == "bytes":
        return v
    if kind == "option":
        assert isinstance(ty, Sum)
        return (
            [1, []]
            if v is None
            else [0, to_sql_json(ts, ty.variants[0].ty, _unwrap_some(v, ts, ty), depth + 1)]
        )
    if isinstance(ty, Prim):
        if ty.name in ("U256", "I256"):
            return "0x" + format(v % (1 << 256), "064x")
        if ty.name in ("F32", "F64") and not math.isfinite(v):
            return None  # serde_json writes non-finite floats as null
        return v
    if isinstance(ty, ArrayT):
        return [to_sql_json(ts, ty.elem, x, depth + 1) for x in v]
    if isinstance(ty, Product):
        if isinstance(v, Mapping):
            return [
                to_sql_json(ts, e.ty, v[e.name if e.name is not None else str(i)], depth + 1)
                for i, e in enumerate(ty.elements)
            ]
        return [to_sql_json(ts, e.ty, x, depth + 1) for e, x in zip(ty.elements, v, strict=True)]
    assert isinstance(ty, Sum)
    if kind == "result":
        ((name, inner),) = v.items()
        tag = 0 if name == "ok" else 1
        return [tag, to_sql_json(ts, ty.variants[tag].ty, inner, depth + 1)]
    names = [var.name for var in ty.variants]
    tag = names.index(v["tag"])
    return [tag, to_sql_json(ts, ty.variants[tag].ty, v.get("value", {}), depth + 1)]


def _unwrap_some(v: Any, ts: Typespace, ty: Sum) -> Any:
    if special_kind(ts.resolve(ty.variants[0].ty)) == "option" and isinstance(v, Mapping):
        return v.get("some")
    return v

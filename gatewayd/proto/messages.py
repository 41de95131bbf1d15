"""SpacetimeDB v2 client/server messages, v3 framing and the compression envelope (sans-IO).

Field orders and tags follow PROTOCOL.md §3.3-§3.5 (which follows upstream ``v2.rs`` and the
generated TS ``client_api/types.ts``). Both directions are implemented for both sides: the client
encodes ClientMessages and decodes ServerMessages; the dev peer does the reverse.

Framing summary:

* client -> server: no envelope byte, never compressed. v2: one message per WebSocket payload.
  v3: one or more messages back to back; an empty payload is an error.
* server -> client: ``[compression tag] ++ body``; tag 0 none, 1 brotli, 2 gzip. v2: the body is one
  message. v3: the body is one or more messages back to back.

Decoding never trusts a declared length: see :class:`gatewayd.proto.bsatn.Reader`.
Decompression is capped (``max_decompressed_bytes``) so a small compressed frame cannot expand
into gigabytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

import brotli

from gatewayd.errors import DecodeError, LocalProtocolError
from gatewayd.proto.bsatn import Reader, Writer, identity_hex


class Protocol(str, Enum):
    V3 = "v3.bsatn.spacetimedb"
    V2 = "v2.bsatn.spacetimedb"


# What we offer, in order. The server's preference wins anyway (PROTOCOL.md §1.1).
OFFERED_PROTOCOLS: Final = (Protocol.V3.value, Protocol.V2.value)


class Compression(int, Enum):
    NONE = 0
    BROTLI = 1
    GZIP = 2

    @property
    def query_value(self) -> str:
        """The ``compression=`` query parameter value (case-sensitive enum names upstream)."""
        return {0: "None", 1: "Brotli", 2: "Gzip"}[self.value]


# The server compresses only bodies larger than this (PROTOCOL.md §3.2).
COMPRESSION_THRESHOLD_BYTES: Final = 1024


# --- row lists -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FixedSize:
    size: int


@dataclass(frozen=True, slots=True)
class RowOffsets:
    offsets: tuple[int, ...]


RowSizeHint: TypeAlias = FixedSize | RowOffsets


@dataclass(frozen=True, slots=True)
class BsatnRowList:
    """Rows' BSATN concatenated, with a hint to split them without a schema (PROTOCOL.md §4.1)."""

    size_hint: RowSizeHint
    rows_data: bytes

    @classmethod
    def from_rows(cls, rows: list[bytes]) -> BsatnRowList:
        """Build a list choosing the hint as the server does: FixedSize when all rows have one
        non-zero length below 2^16, RowOffsets otherwise (and for the empty list)."""
        if rows:
            n = len(rows[0])
            if 0 < n < 2**16 and all(len(r) == n for r in rows):
                return cls(FixedSize(n), b"".join(rows))
        offsets = []
        pos = 0
        for r in rows:
            offsets.append(pos)
            pos += len(r)
        return cls(RowOffsets(tuple(offsets)), b"".join(rows))

    def split(self) -> list[bytes]:
        """Split into rows using the hint; a hint inconsistent with the data is a DecodeError."""
        data = self.rows_data
        hint = self.size_hint
        if isinstance(hint, FixedSize):
            n = hint.size
            if n == 0:
                if data:
                    raise DecodeError("FixedSize(0) row list with non-empty data")
                return []
            if len(data) % n:
                raise DecodeError(f"row data length {len(data)} is not a multiple of FixedSize({n})")
            return [data[i : i + n] for i in range(0, len(data), n)]
        offs = hint.offsets
        rows = []
        for i, start in enumerate(offs):
            stop = offs[i + 1] if i + 1 < len(offs) else len(data)
            if not 0 <= start <= stop <= len(data):
                raise DecodeError(f"row offset {start} is out of order or past the data")
            rows.append(data[start:stop])
        if offs and offs[0] != 0:
            raise DecodeError("first row offset is not 0")
        if not offs and data:
            raise DecodeError("row data present but no row offsets")
        return rows

    def __len__(self) -> int:
        hint = self.size_hint
        if isinstance(hint, FixedSize):
            return len(self.rows_data) // hint.size if hint.size else 0
        return len(hint.offsets)


EMPTY_ROWS: Final = BsatnRowList(RowOffsets(()), b"")


# --- client messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    request_id: int
    query_set_id: int
    query_strings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    request_id: int
    query_set_id: int
    send_dropped_rows: bool = True


@dataclass(frozen=True, slots=True)
class OneOffQuery:
    request_id: int
    query_string: str


@dataclass(frozen=True, slots=True)
class CallReducer:
    request_id: int
    reducer: str
    args: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class CallProcedure:
    request_id: int
    procedure: str
    args: bytes
    flags: int = 0


ClientMessage: TypeAlias = Subscribe | Unsubscribe | OneOffQuery | CallReducer | CallProcedure


# --- server messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SingleTableRows:
    table: str
    rows: BsatnRowList


@dataclass(frozen=True, slots=True)
class QueryRows:
    tables: tuple[SingleTableRows, ...]


@dataclass(frozen=True, slots=True)
class PersistentTableRows:
    inserts: BsatnRowList
    deletes: BsatnRowList


@dataclass(frozen=True, slots=True)
class EventTableRows:
    events: BsatnRowList


TableUpdateRows: TypeAlias = PersistentTableRows | EventTableRows


@dataclass(frozen=True, slots=True)
class TableUpdate:
    table_name: str
    rows: tuple[TableUpdateRows, ...]


@dataclass(frozen=True, slots=True)
class QuerySetUpdate:
    query_set_id: int
    tables: tuple[TableUpdate, ...]


@dataclass(frozen=True, slots=True)
class InitialConnection:
    identity: str  # 64 hex chars, big-endian
    connection_id: str  # 32 hex chars, big-endian
    token: str


@dataclass(frozen=True, slots=True)
class SubscribeApplied:
    request_id: int
    query_set_id: int
    rows: QueryRows


@dataclass(frozen=True, slots=True)
class UnsubscribeApplied:
    request_id: int
    query_set_id: int
    rows: QueryRows | None


@dataclass(frozen=True, slots=True)
class SubscriptionError:
    request_id: int | None
    query_set_id: int
    error: str


@dataclass(frozen=True, slots=True)
class TransactionUpdate:
    query_sets: tuple[QuerySetUpdate, ...]


@dataclass(frozen=True, slots=True)
class OneOffQueryResult:
    request_id: int
    rows: QueryRows | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ReducerOk:
    ret_value: bytes
    transaction_update: TransactionUpdate


@dataclass(frozen=True, slots=True)
class ReducerOkEmpty:
    pass


@dataclass(frozen=True, slots=True)
class ReducerErr:
    """A user error; the payload is (currently always) the BSATN of a String."""

    payload: bytes

    @property
    def message(self) -> str:
        r = Reader(self.payload)
        try:
            s = r.string()
        except DecodeError:
            return self.payload.decode("utf-8", "replace")
        return s if not r.remaining() else self.payload.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class ReducerInternalError:
    message: str


ReducerOutcome: TypeAlias = ReducerOk | ReducerOkEmpty | ReducerErr | ReducerInternalError


@dataclass(frozen=True, slots=True)
class ReducerResult:
    request_id: int
    timestamp: int  # microseconds since the Unix epoch, when the reducer started
    outcome: ReducerOutcome


@dataclass(frozen=True, slots=True)
class ProcedureReturned:
    value: bytes


@dataclass(frozen=True, slots=True)
class ProcedureInternalError:
    message: str


@dataclass(frozen=True, slots=True)
class ProcedureResult:
    status: ProcedureReturned | ProcedureInternalError
    timestamp: int
    total_host_execution_duration: int  # microseconds
    request_id: int


ServerMessage: TypeAlias = (
    InitialConnection
    | SubscribeApplied
    | UnsubscribeApplied
    | SubscriptionError
    | TransactionUpdate
    | OneOffQueryResult
    | ReducerResult
    | ProcedureResult
)


# --- encoding ------------------------------------------------------------------------------------


def _w_rowlist(w: Writer, rl: BsatnRowList) -> None:
    hint = rl.size_hint
    if isinstance(hint, FixedSize):
        w.u8(0)
        w.u16(hint.size)
    else:
        w.u8(1)
        w.u32(len(hint.offsets))
        for o in hint.offsets:
            w.u64(o)
    w.bytes_(rl.rows_data)


def _w_query_rows(w: Writer, qr: QueryRows) -> None:
    w.u32(len(qr.tables))
    for t in qr.tables:
        w.string(t.table)
        _w_rowlist(w, t.rows)


def _w_tx(w: Writer, tx: TransactionUpdate) -> None:
    w.u32(len(tx.query_sets))
    for qs in tx.query_sets:
        w.u32(qs.query_set_id)
        w.u32(len(qs.tables))
        for t in qs.tables:
            w.string(t.table_name)
            w.u32(len(t.rows))
            for r in t.rows:
                if isinstance(r, PersistentTableRows):
                    w.u8(0)
                    _w_rowlist(w, r.inserts)
                    _w_rowlist(w, r.deletes)
                else:
                    w.u8(1)
                    _w_rowlist(w, r.events)


def _w_identity(w: Writer, hexstr: str, nbytes: int) -> None:
    raw = bytes.fromhex(hexstr)
    if len(raw) != nbytes:
        raise LocalProtocolError(f"expected {nbytes * 2} hex chars, got {len(hexstr)}")
    w.raw(raw[::-1])


def encode_client_message(msg: ClientMessage) -> bytes:
    """One ClientMessage's BSATN (no envelope: client messages never have one)."""
    w = Writer()
    if isinstance(msg, Subscribe):
        w.u8(0)
        w.u32(msg.request_id)
        w.u32(msg.query_set_id)
        w.u32(len(msg.query_strings))
        for q in msg.query_strings:
            w.string(q)
    elif isinstance(msg, Unsubscribe):
        w.u8(1)
        w.u32(msg.request_id)
        w.u32(msg.query_set_id)
        w.u8(1 if msg.send_dropped_rows else 0)
    elif isinstance(msg, OneOffQuery):
        w.u8(2)
        w.u32(msg.request_id)
        w.string(msg.query_string)
    elif isinstance(msg, CallReducer):
        w.u8(3)
        w.u32(msg.request_id)
        w.u8(msg.flags)
        w.string(msg.reducer)
        w.bytes_(msg.args)
    else:
        w.u8(4)
        w.u32(msg.request_id)
        w.u8(msg.flags)
        w.string(msg.procedure)
        w.bytes_(msg.args)
    return w.getvalue()


def encode_server_message(msg: ServerMessage) -> bytes:
    """One ServerMessage's BSATN body (without the compression envelope)."""
    w = Writer()
    if isinstance(msg, InitialConnection):
        w.u8(0)
        _w_identity(w, msg.identity, 32)
        _w_identity(w, msg.connection_id, 16)
        w.string(msg.token)
    elif isinstance(msg, SubscribeApplied):
        w.u8(1)
        w.u32(msg.request_id)
        w.u32(msg.query_set_id)
        _w_query_rows(w, msg.rows)
    elif isinstance(msg, UnsubscribeApplied):
        w.u8(2)
        w.u32(msg.request_id)
        w.u32(msg.query_set_id)
        if msg.rows is None:
            w.u8(1)
        else:
            w.u8(0)
            _w_query_rows(w, msg.rows)
    elif isinstance(msg, SubscriptionError):
        w.u8(3)
        if msg.request_id is None:
            w.u8(1)
        else:
            w.u8(0)
            w.u32(msg.request_id)
        w.u32(msg.query_set_id)
        w.string(msg.error)
    elif isinstance(msg, TransactionUpdate):
        w.u8(4)
        _w_tx(w, msg)
    elif isinstance(msg, OneOffQueryResult):
        w.u8(5)
        w.u32(msg.request_id)
        if msg.error is not None:
            w.u8(1)
            w.string(msg.error)
        else:
            w.u8(0)
            _w_query_rows(w, msg.rows if msg.rows is not None else QueryRows(()))
    elif isinstance(msg, ReducerResult):
        w.u8(6)
        w.u32(msg.request_id)
        w.i64(msg.timestamp)
        out = msg.outcome
        if isinstance(out, ReducerOk):
            w.u8(0)
            w.bytes_(out.ret_value)
            _w_tx(w, out.transaction_update)
        elif isinstance(out, ReducerOkEmpty):
            w.u8(1)
        elif isinstance(out, ReducerErr):
            w.u8(2)
            w.bytes_(out.payload)
        else:
            w.u8(3)
            w.string(out.message)
    else:
        w.u8(7)
        if isinstance(msg.status, ProcedureReturned):
            w.u8(0)
            w.bytes_(msg.status.value)
        else:
            w.u8(1)
            w.string(msg.status.message)
        w.i64(msg.timestamp)
        w.i64(msg.total_host_execution_duration)
        w.u32(msg.request_id)
    return w.getvalue()


# --- decoding ------------------------------------------------------------------------------------


def _r_rowlist(r: Reader) -> BsatnRowList:
    p = r.pos
    tag = r.u8()
    hint: RowSizeHint
    if tag == 0:
        hint = FixedSize(r.u16())
    elif tag == 1:
        n = r.array_len(8, "row offsets")
        # One struct call for the whole array: per-offset reads were ~20 % of decoding a big update.
        hint = RowOffsets(struct.unpack_from(f"<{n}Q", r.raw(8 * n, "row offsets")))
    else:
        raise DecodeError(f"unknown RowSizeHint tag {tag}", path="size_hint", offset=p)
    return BsatnRowList(hint, r.bytes_())


def _r_query_rows(r: Reader) -> QueryRows:
    n = r.array_len(9, "tables")  # string (4) + hint tag (1) + data length (4), at least
    return QueryRows(tuple(SingleTableRows(r.string(), _r_rowlist(r)) for _ in range(n)))


def _r_tx(r: Reader) -> TransactionUpdate:
    sets = []
    for _ in range(r.array_len(8, "query sets")):
        qsid = r.u32()
        tables = []
        for _ in range(r.array_len(8, "table updates")):
            name = r.string()
            rows: list[TableUpdateRows] = []
            for _ in range(r.array_len(1, "table update rows")):
                p = r.pos
                tag = r.u8()
                if tag == 0:
                    rows.append(PersistentTableRows(_r_rowlist(r), _r_rowlist(r)))
                elif tag == 1:
                    rows.append(EventTableRows(_r_rowlist(r)))
                else:
                    raise DecodeError(f"unknown TableUpdateRows tag {tag}", offset=p)
            tables.append(TableUpdate(name, tuple(rows)))
        sets.append(QuerySetUpdate(qsid, tuple(tables)))
    return TransactionUpdate(tuple(sets))


def _r_option_tag(r: Reader, what: str) -> bool:
    """Read an Option tag; True for Some (tag 0), False for None (tag 1)."""
    p = r.pos
    tag = r.u8()
    if tag > 1:
        raise DecodeError(f"invalid Option tag {tag} for {what}", offset=p)
    return tag == 0


def decode_server_message(r: Reader) -> ServerMessage:
    """Decode one ServerMessage at the reader's position (v3 callers loop)."""
    p = r.pos
    tag = r.u8()
    if tag == 0:
        ident = identity_hex(r.raw(32, "Identity"))
        conn = identity_hex(r.raw(16, "ConnectionId"))
        return InitialConnection(ident, conn, r.string())
    if tag == 1:
        return SubscribeApplied(r.u32(), r.u32(), _r_query_rows(r))
    if tag == 2:
        rid, qsid = r.u32(), r.u32()
        rows = _r_query_rows(r) if _r_option_tag(r, "UnsubscribeApplied.rows") else None
        return UnsubscribeApplied(rid, qsid, rows)
    if tag == 3:
        rid_opt = r.u32() if _r_option_tag(r, "SubscriptionError.request_id") else None
        return SubscriptionError(rid_opt, r.u32(), r.string())
    if tag == 4:
        return _r_tx(r)
    if tag == 5:
        rid = r.u32()
        rp = r.pos
        rtag = r.u8()
        if rtag == 0:
            return OneOffQueryResult(rid, rows=_r_query_rows(r))
        if rtag == 1:
            return OneOffQueryResult(rid, error=r.string())
        raise DecodeError(f"invalid Result tag {rtag}", path="OneOffQueryResult.result", offset=rp)
    if tag == 6:
        rid = r.u32()
        ts = r.i64()
        op = r.pos
        otag = r.u8()
        outcome: ReducerOutcome
        if otag == 0:
            outcome = ReducerOk(r.bytes_(), _r_tx(r))
        elif otag == 1:
            outcome = ReducerOkEmpty()
        elif otag == 2:
            outcome = ReducerErr(r.bytes_())
        elif otag == 3:
            outcome = ReducerInternalError(r.string())
        else:
            raise DecodeError(f"unknown ReducerOutcome tag {otag}", offset=op)
        return ReducerResult(rid, ts, outcome)
    if tag == 7:
        sp = r.pos
        stag = r.u8()
        status: ProcedureReturned | ProcedureInternalError
        if stag == 0:
            status = ProcedureReturned(r.bytes_())
        elif stag == 1:
            status = ProcedureInternalError(r.string())
        else:
            raise DecodeError(f"unknown ProcedureStatus tag {stag}", offset=sp)
        ts = r.i64()
        dur = r.i64()
        return ProcedureResult(status, ts, dur, r.u32())
    raise DecodeError(f"unknown ServerMessage tag {tag}", offset=p)


def decode_client_message(r: Reader) -> ClientMessage:
    """Decode one ClientMessage (used by the dev peer); nonzero call flags are errors as upstream."""
    p = r.pos
    tag = r.u8()
    if tag == 0:
        rid, qsid = r.u32(), r.u32()
        n = r.array_len(4, "query strings")
        return Subscribe(rid, qsid, tuple(r.string() for _ in range(n)))
    if tag == 1:
        rid, qsid = r.u32(), r.u32()
        fp = r.pos
        flag = r.u8()
        if flag > 1:
            raise DecodeError(f"unknown UnsubscribeFlags tag {flag}", offset=fp)
        return Unsubscribe(rid, qsid, flag == 1)
    if tag == 2:
        return OneOffQuery(r.u32(), r.string())
    if tag in (3, 4):
        rid = r.u32()
        fp = r.pos
        flags = r.u8()
        if flags != 0:
            raise DecodeError(f"call flags must be 0, got {flags}", offset=fp)
        name = r.string()
        args = r.bytes_()
        return CallReducer(rid, name, args) if tag == 3 else CallProcedure(rid, name, args)
    raise DecodeError(f"unknown ClientMessage tag {tag}", offset=p)


# --- payload framing -----------------------------------------------------------------------------


def _decompress(tag: int, body: bytes, limit: int) -> bytes:
    if tag == Compression.NONE:
        return body
    if tag == Compression.GZIP:
        d = zlib.decompressobj(wbits=31)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise DecodeError(f"corrupt gzip payload: {exc}") from None
        if len(out) > limit:
            raise DecodeError(f"gzip payload expands past {limit} bytes")
        if not d.eof:
            raise DecodeError("truncated gzip payload")
        return out
    if tag == Compression.BROTLI:
        dec = brotli.Decompressor()
        try:
            out = dec.process(body, output_buffer_limit=limit + 1)
        except brotli.error as exc:
            raise DecodeError(f"corrupt brotli payload: {exc}") from None
        if len(out) > limit:
            raise DecodeError(f"brotli payload expands past {limit} bytes")
        if not dec.is_finished():
            raise DecodeError("truncated brotli payload")
        return bytes(out)
    raise DecodeError(f"unknown compression tag {tag} (expected 0, 1 or 2)", offset=0)


def decode_server_payload(
    frame: bytes, protocol: Protocol, *, max_decompressed_bytes: int = 64 * 1024 * 1024
) -> list[ServerMessage]:
    """One WebSocket binary payload from the server -> its messages (one for v2, >= 1 for v3)."""
    if not frame:
        raise DecodeError("empty server payload (no compression tag)")
    body = _decompress(frame[0], frame[1:], max_decompressed_bytes)
    r = Reader(body)
    if protocol is Protocol.V2:
        # v2 is not strict about trailing bytes (PROTOCOL.md §3.1): decode one, ignore the rest.
        return [decode_server_message(r)]
    if not body:
        raise DecodeError("empty v3 payload")
    msgs = []
    while r.remaining():
        msgs.append(decode_server_message(r))
    return msgs


def encode_server_payload(
    msgs: list[ServerMessage] | tuple[ServerMessage, ...],
    protocol: Protocol,
    compression: Compression = Compression.NONE,
) -> bytes:
    """Messages -> one server WebSocket payload (v2 takes exactly one message)."""
    if protocol is Protocol.V2 and len(msgs) != 1:
        raise LocalProtocolError("a v2 payload carries exactly one message")
    if not msgs:
        raise LocalProtocolError("a v3 payload carries at least one message")
    body = b"".join(encode_server_message(m) for m in msgs)
    return wrap_server_body(body, compression)


def wrap_server_body(body: bytes, compression: Compression) -> bytes:
    """Prefix the envelope tag, compressing as the server does (only above the threshold)."""
    if compression is Compression.NONE or len(body) <= COMPRESSION_THRESHOLD_BYTES:
        return b"\x00" + body
    if compression is Compression.GZIP:
        return b"\x02" + gzip.compress(body, compresslevel=1, mtime=0)
    compressed: bytes = brotli.compress(body, quality=1)
    return b"\x01" + compressed


def decode_client_payload(payload: bytes, protocol: Protocol) -> list[ClientMessage]:
    """One client WebSocket payload -> its messages (the dev peer's side)."""
    if not payload:
        raise DecodeError("empty client payload")
    r = Reader(payload)
    if protocol is Protocol.V2:
        return [decode_client_message(r)]
    msgs = []
    while r.remaining():
        msgs.append(decode_client_message(r))
    return msgs


@dataclass(frozen=True, slots=True)
class ClientFramer:
    """Batches outgoing client messages for v3 (several per payload), one per payload for v2.

    The TS SDK caps v3 payloads at 256 KiB; we do the same.
    """

    protocol: Protocol
    max_payload_bytes: int = 256 * 1024

    def frames(self, msgs: list[ClientMessage]) -> list[bytes]:
        encoded = [encode_client_message(m) for m in msgs]
        if self.protocol is Protocol.V2:
            return encoded
        out: list[bytes] = []
        cur: list[bytes] = []
        size = 0
        for e in encoded:
            if cur and size + len(e) > self.max_payload_bytes:
                out.append(b"".join(cur))
                cur, size = [], 0
            cur.append(e)
            size += len(e)
        if cur:
            out.append(b"".join(cur))
        return out

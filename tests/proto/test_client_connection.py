"""The sans-IO client connection: request ids, procedure and one-off answers, lost calls."""

from __future__ import annotations

import pytest

from gatewayd.errors import DecodeError, LocalProtocolError, UpstreamProtocolError
from gatewayd.proto import client as pc
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import Reader
from gatewayd.proto.sats import STRING, U64, Typespace, product
from gatewayd.proto.schema import ModuleSchema, TableDef

ROW = product(id=U64, name=STRING)


def conn(protocol: m.Protocol = m.Protocol.V3) -> pc.ClientConnection:
    schema = ModuleSchema(typespace=Typespace([ROW]))
    schema.tables["person"] = TableDef("person", 0, ROW, primary_key=(0,))
    return pc.ClientConnection(protocol, schema)


def server(*msgs: m.ServerMessage) -> bytes:
    return m.encode_server_payload(list(msgs), m.Protocol.V3)


def test_requests_share_one_counter_and_query_sets_another() -> None:
    c = conn()
    qsid, sub = c.subscribe(["SELECT * FROM person"])
    rid, call = c.call_reducer("add", b"")
    assert m.decode_client_message(Reader(call)) == m.CallReducer(1, "add", b"")
    pid, proc = c.call_procedure("p", b"\x01")
    oid, one = c.one_off_query("SELECT * FROM person")
    assert (qsid, rid, pid, oid) == (0, 1, 2, 3)
    assert m.decode_client_message(Reader(sub)) == m.Subscribe(0, 0, ("SELECT * FROM person",))
    assert m.decode_client_message(Reader(proc)) == m.CallProcedure(2, "p", b"\x01")
    assert m.decode_client_message(Reader(one)) == m.OneOffQuery(3, "SELECT * FROM person")


def test_procedure_and_one_off_answers_and_lost_calls() -> None:
    c = conn()
    c.receive_payload(server(m.InitialConnection("c2" + "00" * 31, "00" * 16, "t")))
    pid, _ = c.call_procedure("p", b"")
    pid2, _ = c.call_procedure("q", b"")
    oid, _ = c.one_off_query("SELECT * FROM person")
    rid, _ = c.call_reducer("slow", b"")
    row = c.schema.codec.encode(ROW, {"id": 1, "name": "Ann"})
    events = c.receive_payload(
        server(
            m.ProcedureResult(m.ProcedureReturned(b"\x2a"), 0, 10, pid),
            m.ProcedureResult(m.ProcedureInternalError("boom"), 0, 10, pid2),
            m.OneOffQueryResult(
                oid, rows=m.QueryRows((m.SingleTableRows("person", m.BsatnRowList.from_rows([row])),))
            ),
        )
    )
    assert events == [
        pc.ProcedureReturned(pid, b"\x2a"),
        pc.ProcedureFailed(pid2, "boom"),
        pc.OneOffResult(oid, {"person": [{"id": 1, "name": "Ann"}]}, None),
    ]
    # The link drops: the reducer still waiting is "outcome unknown".
    assert c.connection_lost() == [pc.CallLost(rid)]
    with pytest.raises(LocalProtocolError):
        c.call_reducer("again", b"")


def test_answers_to_requests_we_never_made_are_protocol_errors() -> None:
    c = conn()
    with pytest.raises(UpstreamProtocolError, match="did not make"):
        c.receive_payload(server(m.ReducerResult(7, 0, m.ReducerOkEmpty())))
    with pytest.raises(UpstreamProtocolError, match="unknown query set"):
        c.receive_payload(server(m.TransactionUpdate((m.QuerySetUpdate(9, ()),))))


def test_partial_v3_payload_keeps_the_events_before_a_bad_message() -> None:
    c = conn()
    qsid, _ = c.subscribe(["SELECT * FROM person"])
    good = m.SubscribeApplied(0, qsid, m.QueryRows(()))
    bad = m.TransactionUpdate(
        (
            m.QuerySetUpdate(
                qsid,
                (
                    m.TableUpdate(
                        "person", (m.PersistentTableRows(m.BsatnRowList.from_rows([b"\x01"]), m.EMPTY_ROWS),)
                    ),
                ),
            ),
        )
    )
    with pytest.raises(DecodeError) as info:
        c.receive_payload(server(good, bad))
    partial = info.value.partial_events  # type: ignore[attr-defined]
    assert [type(e) for e in partial] == [pc.SubscriptionApplied]

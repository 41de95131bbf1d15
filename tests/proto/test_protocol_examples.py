"""Every byte example of PROTOCOL.md §3.7 decodes to the stated message and re-encodes exactly."""

from __future__ import annotations

import pytest

from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import Reader, ValueCodec
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.sats import STRING, product


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


PERSON = product(name=STRING)
IDENT = "c200ef884364c1a99be0298dc68f2004e6b97c09d1b1658b7db22f51fb662059"
TS = 1_700_000_000_000_000

CLIENT_EXAMPLES = [
    (
        m.Subscribe(1, 1, ("SELECT * FROM person",)),
        "00 01000000 01000000 01000000 14000000 53454c454354202a2046524f4d20706572736f6e",
    ),
    (
        m.CallReducer(2, "add", ValueCodec().encode(PERSON, {"name": "Alice"})),
        "03 02000000 00 03000000 616464 09000000 05000000416c696365",
    ),
    (m.Unsubscribe(3, 1, send_dropped_rows=True), "01 03000000 01000000 01"),
    (
        m.OneOffQuery(4, "SELECT * FROM person"),
        "02 04000000 14000000 53454c454354202a2046524f4d20706572736f6e",
    ),
    (m.CallProcedure(5, "p", b""), "04 05000000 00 01000000 70 00000000"),
]

ALICE_BOB = m.BsatnRowList(m.RowOffsets((0, 9)), h("05000000416c696365 03000000426f62"))

SERVER_EXAMPLES = [
    (
        m.InitialConnection(IDENT, "0102030405060708090a0b0c0d0e0f10", "tok"),
        "00 592066fb512fb27d8b65b1d1097cb9e604208fc68d29e09ba9c1644388ef00c2"
        " 100f0e0d0c0b0a090807060504030201 03000000 746f6b",
    ),
    (
        m.SubscribeApplied(
            1,
            1,
            m.QueryRows(
                (m.SingleTableRows("person", m.BsatnRowList(m.FixedSize(9), h("05000000416c696365"))),)
            ),
        ),
        "01 01000000 01000000 01000000 06000000 706572736f6e 00 0900 09000000 05000000416c696365",
    ),
    (
        m.TransactionUpdate(
            (
                m.QuerySetUpdate(
                    1, (m.TableUpdate("person", (m.PersistentTableRows(ALICE_BOB, m.EMPTY_ROWS),)),)
                ),
            )
        ),
        "04 01000000 01000000 01000000 06000000 706572736f6e 01000000 00"
        " 01 02000000 0000000000000000 0900000000000000 10000000 05000000416c696365 03000000426f62"
        " 01 00000000 00000000",
    ),
    (
        m.ReducerResult(2, TS, m.ReducerOk(b"", m.TransactionUpdate(()))),
        "06 02000000 00401e18240a0600 00 00000000 00000000",
    ),
    (
        m.ReducerResult(2, TS, m.ReducerErr(h("04000000626f6f6d"))),
        "06 02000000 00401e18240a0600 02 08000000 04000000626f6f6d",
    ),
    (m.SubscriptionError(None, 1, "bad"), "03 01 01000000 03000000 626164"),
    (m.SubscriptionError(9, 1, "bad"), "03 00 09000000 01000000 03000000 626164"),
    (m.UnsubscribeApplied(3, 1, None), "02 03000000 01000000 01"),
    (m.OneOffQueryResult(4, error="err"), "05 04000000 01 03000000 657272"),
    (
        m.ProcedureResult(m.ProcedureReturned(h("2a000000")), TS, 1500, 5),
        "07 00 04000000 2a000000 00401e18240a0600 dc05000000000000 05000000",
    ),
]


@pytest.mark.parametrize(("msg", "hexstr"), CLIENT_EXAMPLES, ids=lambda x: type(x).__name__)
def test_client_example_encodes_and_decodes(msg: m.ClientMessage, hexstr: str) -> None:
    assert m.encode_client_message(msg) == h(hexstr)
    r = Reader(h(hexstr))
    assert m.decode_client_message(r) == msg
    assert r.remaining() == 0


@pytest.mark.parametrize(("msg", "hexstr"), SERVER_EXAMPLES, ids=lambda x: type(x).__name__)
def test_server_example_decodes_and_reencodes(msg: m.ServerMessage, hexstr: str) -> None:
    raw = h(hexstr)
    (decoded,) = m.decode_server_payload(b"\x00" + raw, m.Protocol.V2)
    assert decoded == msg
    assert m.encode_server_message(decoded) == raw
    # v3: the same bytes twice in one payload are two messages.
    assert m.decode_server_payload(b"\x00" + raw + raw, m.Protocol.V3) == [msg, msg]


def test_example_rows_decode_with_the_schema() -> None:
    codec = ValueCodec()
    (tx,) = m.decode_server_payload(b"\x00" + h(SERVER_EXAMPLES[2][1]), m.Protocol.V2)
    assert isinstance(tx, m.TransactionUpdate)
    rows = tx.query_sets[0].tables[0].rows[0]
    assert isinstance(rows, m.PersistentTableRows)
    values, raws = codec.decode_rows(PERSON, rows.inserts.rows_data)
    assert values == [{"name": "Alice"}, {"name": "Bob"}]
    assert raws == rows.inserts.split()


def test_reducer_err_payload_is_a_bsatn_string() -> None:
    assert m.ReducerErr(h("04000000626f6f6d")).message == "boom"


@pytest.mark.parametrize(
    ("iss", "sub", "expected"),
    [
        ("example.com", "123", IDENT),
        (
            "localhost",
            "6d4b5430-00cf-4a99-932c-ad2d07bab841",
            "c200483152d642c7d402de06cacc36dcb0c2a1f2bbeb8e7d5a673f2435cca975",
        ),
    ],
)
def test_identity_vectors(iss: str, sub: str, expected: str) -> None:
    assert identity_hex(iss, sub) == expected

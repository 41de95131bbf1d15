"""Decode benchmark: a v2 TransactionUpdate of 10,000 rows, our codec vs the TypeScript SDK.

    . .venv/bin/activate && python bench/decode_rows.py            # table + bench/results/decode_rows.json
    python bench/decode_rows.py --profile                          # + cProfile of our decode
    python bench/decode_rows.py --rows 50000 --runs 30             # other sizes

The payload is built with our codec (encode_server_payload, no compression): one query set, one
table, 10,000 inserted rows of ``TASK`` (u64 id, Identity owner, string tenant_id, ~40-byte string
title, Timestamp updated_at, bool done) in a RowOffsets row list, as the server sends rows of
varying length. One run of ours is ``decode_server_payload`` + ``ValueCodec.decode_rows`` for every
row list, giving JSON-ready dicts (and each row's raw bytes). One run of the SDK (a Node subprocess,
bench/decode_rows.mjs) is ``ServerMessage.deserialize`` + the row type's ``deserialize`` for every
row, giving JS objects. Both report the best of several runs after a warmup, and the first/last
decoded rows are compared so both sides are known to decode the same data. Target (issue):
>= 500,000 rows/s and >= 0.3x the SDK.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gatewayd.proto import messages as m  # noqa: E402
from gatewayd.proto.bsatn import ValueCodec  # noqa: E402
from gatewayd.proto.sats import BOOL, IDENTITY, STRING, TIMESTAMP, U64, product  # noqa: E402

TASK = product(id=U64, owner=IDENTITY, tenant_id=STRING, title=STRING, updated_at=TIMESTAMP, done=BOOL)
HARNESS = ROOT / "tests" / "harness" / "ts-sdk"
RESULTS = ROOT / "bench" / "results"
TARGET_ROWS_PER_S = 500_000
TARGET_RATIO = 0.3

_TITLE_WORDS = (
    "fix update review deploy write draft plan check migrate refactor the login page billing report api "
    "docs invoice sync cache schema for customer team weekly release"
)
WORDS = _TITLE_WORDS.split()


def make_rows(n: int, seed: int = 42) -> list[dict[str, Any]]:
    """Deterministic, realistic rows: few owners and tenants, titles of 36-44 bytes."""
    rng = random.Random(seed)
    owners = [bytes([0xC2, 0x00]).hex() + rng.randbytes(30).hex() for _ in range(50)]
    tenants = [f"tenant-{rng.randrange(10**6):06d}" for _ in range(20)]
    base = 1_750_000_000_000_000
    rows = []
    for i in range(n):
        target = rng.randrange(36, 45)
        title = f"#{i} "
        while len(title) < target:
            title += rng.choice(WORDS) + " "
        rows.append(
            {
                "id": i + 1,
                "owner": rng.choice(owners),
                "tenant_id": rng.choice(tenants),
                "title": title[:target].rstrip() + "!",
                "updated_at": base + rng.randrange(10**12),
                "done": rng.random() < 0.3,
            }
        )
    return rows


def build_payload(codec: ValueCodec, rows: list[dict[str, Any]]) -> bytes:
    row_list = m.BsatnRowList.from_rows([codec.encode(TASK, r) for r in rows])
    tx = m.TransactionUpdate(
        (m.QuerySetUpdate(1, (m.TableUpdate("task", (m.PersistentTableRows(row_list, m.EMPTY_ROWS),)),)),)
    )
    return m.encode_server_payload([tx], m.Protocol.V2)


def decode_all(codec: ValueCodec, payload: bytes) -> list[Any]:
    """What one received frame costs us: message decode + every row list to JSON-ready rows."""
    out: list[Any] = []
    for msg in m.decode_server_payload(payload, m.Protocol.V2):
        assert isinstance(msg, m.TransactionUpdate)
        for qs in msg.query_sets:
            for table in qs.tables:
                for r in table.rows:
                    lists = (r.inserts, r.deletes) if isinstance(r, m.PersistentTableRows) else (r.events,)
                    for rl in lists:
                        values, _raws = codec.decode_rows(TASK, rl.rows_data)
                        out.extend(values)
    return out


def time_best(fn: Any, warmup: int, runs: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        # Freeing the previous run's rows is not decoding: keep it out of the timed region (V8
        # likewise frees the SDK's rows in its own GC, outside the best runs).
        del result
    return min(times), statistics.median(times)


def run_python(payload: bytes, n_rows: int, warmup: int, runs: int) -> dict[str, Any]:
    codec = ValueCodec()
    rows = decode_all(codec, payload)
    assert len(rows) == n_rows
    best, median = time_best(lambda: decode_all(codec, payload), warmup, runs)
    # Where the time goes: the message (incl. splitting RowOffsets) vs the rows.
    (msg,) = m.decode_server_payload(payload, m.Protocol.V2)
    assert isinstance(msg, m.TransactionUpdate)
    row_list = msg.query_sets[0].tables[0].rows[0]
    assert isinstance(row_list, m.PersistentTableRows)
    data = row_list.inserts.rows_data
    msg_best, _ = time_best(lambda: m.decode_server_payload(payload, m.Protocol.V2), warmup, runs)
    rows_best, _ = time_best(lambda: codec.decode_rows(TASK, data), warmup, runs)
    return {
        "rows": n_rows,
        "best_s": best,
        "median_s": median,
        "rows_per_s": n_rows / best,
        "message_only_best_s": msg_best,
        "decode_rows_only_best_s": rows_best,
        "first": rows[0],
        "last": rows[-1],
    }


def ensure_harness() -> str:
    node = shutil.which("node")
    if node is None:
        sys.exit("node is not on PATH: the SDK half of this benchmark needs Node.js >= 20")
    proc = subprocess.run(["bash", str(HARNESS / "setup.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tests/harness/ts-sdk/setup.sh failed:\n{proc.stderr}")
    return node


def run_node(payload: bytes, warmup: int, runs: int) -> dict[str, Any]:
    node = ensure_harness()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"payload-{os.getpid()}.tmp"  # git-ignored
    try:
        tmp.write_bytes(payload)
        proc = subprocess.run(
            [node, str(ROOT / "bench" / "decode_rows.mjs"), str(tmp), str(warmup), str(runs)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        tmp.unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.exit(f"bench/decode_rows.mjs failed:\n{proc.stderr}")
    res: dict[str, Any] = json.loads(proc.stdout)
    res["rows_per_s"] = res["rows"] / res["best_s"]
    return res


def same_row(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    return {k: str(v) if k in ("id", "updated_at") else v for k, v in ours.items()} == theirs


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def profile(payload: bytes) -> str:
    codec = ValueCodec()
    decode_all(codec, payload)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        decode_all(codec, payload)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=3, help="Python warmup runs (Node: 10x)")
    ap.add_argument("--runs", type=int, default=25, help="timed runs per side; the best is kept")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of our decode")
    ap.add_argument("--no-write", action="store_true", help="do not write the results JSON")
    args = ap.parse_args()

    codec = ValueCodec()
    rows = make_rows(args.rows)
    payload = build_payload(codec, rows)
    py = run_python(payload, args.rows, args.warmup, args.runs)
    ts = run_node(payload, args.warmup * 10, args.runs * 2)
    if ts["rows"] != args.rows or not (
        same_row(py["first"], ts["first"]) and same_row(py["last"], ts["last"])
    ):
        sys.exit(f"the two decoders disagree:\nours   {py['first']}\ntheirs {ts['first']}")
    ratio = py["rows_per_s"] / ts["rows_per_s"]

    print(f"payload: {len(payload):,} bytes, {args.rows:,} rows, one v2 TransactionUpdate")
    print(f"{'decoder':<44} {'best ms':>9} {'median ms':>10} {'rows/s':>12}")
    print(f"{'gatewayd (Python) message + rows':<44} {py['best_s'] * 1e3:9.2f} "
          f"{py['median_s'] * 1e3:10.2f} {py['rows_per_s']:12,.0f}")  # fmt: skip
    print(f"{'  of which decode_server_payload':<44} {py['message_only_best_s'] * 1e3:9.2f}")
    print(f"{'  of which ValueCodec.decode_rows':<44} {py['decode_rows_only_best_s'] * 1e3:9.2f}")
    print(f"{'TS SDK ' + ts['sdk'] + ' (Node ' + ts['node'] + ')':<44} {ts['best_s'] * 1e3:9.2f} "
          f"{ts['median_s'] * 1e3:10.2f} {ts['rows_per_s']:12,.0f}")  # fmt: skip
    ok_rate = py["rows_per_s"] >= TARGET_ROWS_PER_S
    ok_ratio = ratio >= TARGET_RATIO
    print(f"ratio ours/TS: {ratio:.3f}  (target >= {TARGET_RATIO}: {'met' if ok_ratio else 'MISSED'}); "
          f"ours >= {TARGET_ROWS_PER_S:,} rows/s: {'met' if ok_rate else 'MISSED'}")  # fmt: skip

    if args.profile:
        print(profile(payload))

    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "decode v2 TransactionUpdate rows to JSON-ready values / JS objects",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {**machine(), "node": ts["node"]},
            "payload_bytes": len(payload),
            "rows": args.rows,
            "row_type": "id u64, owner Identity, tenant_id String, title String (36-44 B), "
            "updated_at Timestamp, done bool",
            "python": {k: v for k, v in py.items() if k not in ("first", "last")},
            "ts_sdk": {k: v for k, v in ts.items() if k not in ("first", "last")},
            "ratio_ours_over_ts": ratio,
            "targets": {
                "rows_per_s": TARGET_ROWS_PER_S,
                "ratio": TARGET_RATIO,
                "rows_per_s_met": ok_rate,
                "ratio_met": ok_ratio,
            },
        }
        path = RESULTS / "decode_rows.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

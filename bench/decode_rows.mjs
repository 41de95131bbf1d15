// The TypeScript-SDK half of bench/decode_rows.py (run by it; not meant to be run alone).
//
//   node bench/decode_rows.mjs PAYLOAD_FILE WARMUP RUNS
//
// PAYLOAD_FILE holds one v2 server WebSocket payload (envelope byte 0 + a TransactionUpdate) made
// by our codec. Each run does what the SDK's DbConnection does on receipt (db_connection_impl.ts
// `#parseRowList`, minus the cache): ServerMessage.deserialize, then for every row list of every
// table, reader.reset(rowsData) and rowType.deserialize(reader) until no bytes remain, collecting
// the JS row objects. Prints one JSON object on stdout.
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { BinaryReader, t, api } from '../tests/harness/ts-sdk/sdk.mjs';

const [file, warmupArg, runsArg] = process.argv.slice(2);
const warmup = Number(warmupArg ?? 20);
const runs = Number(runsArg ?? 30);
const payload = new Uint8Array(readFileSync(file));
if (payload[0] !== 0) throw new Error(`expected an uncompressed payload (envelope 0), got ${payload[0]}`);
const body = payload.subarray(1);

// Same columns, same order as TASK in bench/decode_rows.py.
const Task = t.row({
  id: t.u64(),
  owner: t.identity(),
  tenant_id: t.string(),
  title: t.string(),
  updated_at: t.timestamp(),
  done: t.bool(),
});

const rowReader = new BinaryReader(new Uint8Array(0));

function decodeRowList(rowList, out) {
  rowReader.reset(rowList.rowsData);
  while (rowReader.remaining > 0) out.push(Task.deserialize(rowReader));
}

function decodeAll() {
  const msg = api.ServerMessage.deserialize(new BinaryReader(body));
  if (msg.tag !== 'TransactionUpdate') throw new Error(`unexpected message ${msg.tag}`);
  const rows = [];
  for (const qs of msg.value.querySets) {
    for (const table of qs.tables) {
      for (const r of table.rows) {
        if (r.tag === 'PersistentTable') {
          decodeRowList(r.value.inserts, rows);
          decodeRowList(r.value.deletes, rows);
        } else {
          decodeRowList(r.value.events, rows);
        }
      }
    }
  }
  return rows;
}

let rows = [];
for (let i = 0; i < warmup; i++) rows = decodeAll();
const times = [];
for (let i = 0; i < runs; i++) {
  const t0 = performance.now();
  rows = decodeAll();
  times.push((performance.now() - t0) / 1000);
}
times.sort((a, b) => a - b);

const sample = row => ({
  id: row.id.toString(),
  owner: row.owner.toHexString(),
  tenant_id: row.tenant_id,
  title: row.title,
  updated_at: row.updated_at.microsSinceUnixEpoch.toString(),
  done: row.done,
});
const sdkVersion = JSON.parse(
  readFileSync(new URL('../tests/harness/ts-sdk/node_modules/spacetimedb/package.json', import.meta.url))
).version;

process.stdout.write(
  JSON.stringify({
    rows: rows.length,
    best_s: times[0],
    median_s: times[Math.floor(times.length / 2)],
    runs,
    warmup,
    node: process.version,
    sdk: `spacetimedb@${sdkVersion}`,
    first: sample(rows[0]),
    last: sample(rows[rows.length - 1]),
  })
);

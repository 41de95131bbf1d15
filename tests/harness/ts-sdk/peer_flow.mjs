// The official TypeScript SDK against the dev peer: the acceptance flow of issue 3.
//
// stdin: JSON {uri, database, aliceToken, aliceIdentity, bobToken, compression}
// stdout: one JSON object summarising what the SDK observed (the Python test asserts on it).
// Exit code 0 only when every step behaved as a real SpacetimeDB would make the SDK behave;
// any mismatch (callback missing, wrong data, a throw inside the SDK) fails with a message.
//
// Steps: connect with a token (the SDK exchanges it at /v1/identity/websocket-token first),
// subscribe and receive the initial rows, call a reducer and get its result (and its rows),
// get a reducer error as a rejected promise, see a row written by another client (a second
// DbConnection), see an update as onUpdate, unsubscribe and see the dropped rows as onDelete.
import { setGlobalLogLevel } from 'spacetimedb';
import { DbConnection } from './demo_bindings.mjs';

const TIMEOUT_MS = 20000;
setGlobalLogLevel('warn');

function fail(message) {
  process.stderr.write(`peer_flow: FAIL: ${message}\n`);
  process.exit(1);
}
// An exception thrown inside the SDK's WebSocket handlers would otherwise kill Node silently.
process.on('uncaughtException', err => fail(`uncaught exception: ${err?.stack ?? err}`));
process.on('unhandledRejection', err => fail(`unhandled rejection: ${err?.stack ?? err}`));
const watchdog = setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS);

function expect(cond, message) {
  if (!cond) fail(message);
}

function waitFor(what, register) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10000);
    register(value => {
      clearTimeout(t);
      resolve(value);
    });
  });
}

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

function connect(cfg, token, label) {
  return new Promise((resolve, reject) => {
    let builder = DbConnection.builder().withUri(cfg.uri).withDatabaseName(cfg.database);
    if (token !== undefined) builder = builder.withToken(token);
    const conn = builder
      .withCompression(cfg.compression)
      .withConfirmedReads(true)
      .onConnect((c, identity, tok) => resolve({ conn: c, identity, token: tok }))
      .onConnectError((_ctx, err) => reject(new Error(`${label}: connect error: ${err}`)))
      .onDisconnect((_ctx, err) => {
        if (!closing) reject(new Error(`${label}: disconnected early: ${err}`));
      })
      .build();
    void conn;
  });
}

let closing = false;
const out = { steps: [] };
const step = name => out.steps.push(name);

const cfg = await readStdin();

// 1. connect with a token
const alice = await connect(cfg, cfg.aliceToken, 'alice');
expect(alice.identity.toHexString() === cfg.aliceIdentity, `alice identity ${alice.identity.toHexString()} != ${cfg.aliceIdentity}`);
expect(alice.token === cfg.aliceToken, 'onConnect must report the token the client was built with');
out.connectionId = alice.conn.connectionId.toHexString();
step('connected');

const events = [];
const db = alice.conn.db;
db.document.onInsert((ctx, row) => events.push({ kind: 'insert', event: ctx.event.tag, title: row.title, id: row.id.toString() }));
db.document.onDelete((ctx, row) => events.push({ kind: 'delete', event: ctx.event.tag, title: row.title, id: row.id.toString() }));
db.document.onUpdate((ctx, oldRow, newRow) =>
  events.push({ kind: 'update', event: ctx.event.tag, old: oldRow.title, new: newRow.title, id: newRow.id.toString() })
);

// 2. subscribe and receive the initial rows
let handle;
await waitFor('SubscribeApplied', done => {
  handle = alice.conn
    .subscriptionBuilder()
    .onApplied(() => done())
    .onError((_ctx, err) => fail(`subscription error: ${err}`))
    .subscribe("SELECT * FROM document WHERE tenant_id = 'acme'");
});
expect(handle.isActive(), 'the handle must be active after onApplied');
out.initialTitles = [...db.document.iter()].map(r => r.title).sort();
expect(db.document.count() === 2n, `expected 2 acme documents, cache has ${db.document.count()}`);
expect(events.every(e => e.kind === 'insert' && e.event === 'SubscribeApplied'), 'initial rows fire onInsert(SubscribeApplied)');
step('subscribed');

// 3. call a reducer and get its result (and its own rows, from ReducerResult)
events.length = 0;
const bigBody = 'x'.repeat(3000); // over 1024 bytes: the update travels gzip-compressed
await alice.conn.reducers.createDocument({ tenantId: 'acme', title: 'from node', body: bigBody });
const mine = [...db.document.iter()].find(r => r.title === 'from node');
expect(mine !== undefined && mine.body === bigBody, 'the caller sees its own insert once the reducer resolves');
expect(mine.updatedBy.toHexString() === cfg.aliceIdentity, 'updated_by is the caller');
expect(events.length === 1 && events[0].event === 'Reducer', `caller insert event: ${JSON.stringify(events)}`);
out.myDocumentId = mine.id.toString();
step('reducer-ok');

// 4. a reducer error comes back as a rejected promise with the module's message
let rejected = null;
try {
  await alice.conn.reducers.createDocument({ tenantId: 'globex', title: 'nope', body: '' });
} catch (err) {
  rejected = String(err?.message ?? err);
}
expect(rejected !== null && rejected.includes('may not document.create in tenant globex'), `reducer error: ${rejected}`);
out.reducerError = rejected;
step('reducer-err');

// 5. a row written by another client arrives as a Transaction event
const bob = await connect(cfg, cfg.bobToken, 'bob');
events.length = 0;
const seen = waitFor('bob\'s insert', done => {
  db.document.onInsert((ctx, row) => {
    if (row.title === 'from bob') done(ctx.event.tag);
  });
});
await bob.conn.reducers.createDocument({ tenantId: 'acme', title: 'from bob', body: 'hi' });
out.foreignInsertEvent = await seen;
expect(out.foreignInsertEvent === 'Transaction', `foreign insert event: ${out.foreignInsertEvent}`);
step('foreign-insert');

// 6. an update by the other client arrives as onUpdate (delete + insert of the same key)
const updated = waitFor('onUpdate', done => {
  db.document.onUpdate((_ctx, oldRow, newRow) => {
    if (newRow.title === 'renamed by bob') done([oldRow.title, newRow.title]);
  });
});
await bob.conn.reducers.updateDocument({ id: mine.id, title: 'renamed by bob', body: 'short' });
out.update = await updated;
expect(db.document.count() === 4n, `expected 4 documents, cache has ${db.document.count()}`);
step('foreign-update');

// 7. unsubscribe: the dropped rows fire onDelete and the cache empties
events.length = 0;
await waitFor('UnsubscribeApplied', done => handle.unsubscribeThen(() => done()));
out.droppedTitles = events.filter(e => e.kind === 'delete').map(e => e.title).sort();
expect(out.droppedTitles.length === 4, `expected 4 dropped rows: ${JSON.stringify(events)}`);
expect(db.document.count() === 0n, 'the cache is empty after unsubscribing');
expect(handle.isEnded(), 'the handle has ended');
step('unsubscribed');

// 8. an anonymous connection gets a fresh identity and token from the peer and can read
const anon = await connect(cfg, undefined, 'anonymous');
const anonId = anon.identity.toHexString();
expect(/^c200[0-9a-f]{60}$/.test(anonId), `anonymous identity ${anonId}`);
expect(typeof anon.token === 'string' && anon.token.split('.').length === 3, 'anonymous token is a JWT');
await waitFor('anonymous SubscribeApplied', done => {
  anon.conn.subscriptionBuilder().onApplied(() => done()).subscribe('SELECT * FROM tenant');
});
out.anonymousTenants = [...anon.conn.db.tenant.iter()].map(r => r.id).sort();
out.anonymousIdentity = anonId;
step('anonymous');

closing = true;
alice.conn.disconnect();
bob.conn.disconnect();
anon.conn.disconnect();
clearTimeout(watchdog);
process.stdout.write(JSON.stringify(out) + '\n');
// undici keeps sockets alive for a moment; do not wait for them
setTimeout(() => process.exit(0), 50);

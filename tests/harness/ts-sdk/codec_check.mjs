// Cross-check driver: runs encode/decode cases through the official SDK codec and reports what it
// produced, so tests/node/test_ts_sdk_codec.py can compare it with gatewayd's codec.
//
//   node codec_check.mjs < cases.json > results.json
//
// Input:  {"cases": [case, ...]}. Output: {"results": [result, ...]} in the same order.
//
// A case names a codec:
//   "ClientMessage" | "ServerMessage"  the v2 messages from the SDK's client_api/types.ts
//   {"sats": <SATS-JSON AlgebraicType>} a row type, rebuilt with the SDK's `t` builders (a top-level
//                                      product becomes `t.row({...})`; special products and sums
//                                      become t.identity(), t.option(), t.scheduleAt(), ...)
// and an op:
//   decode       {hex, reencode?} -> {value, remaining, reencoded}   (one value; bytes left reported)
//   encode       {value}          -> {hex}
//   decode_many  {hex}            -> {values, remaining}              (loop while bytes remain, as
//                                                                      the SDK does for row lists and v3)
//   encode_many  {values}         -> {hex}                            (values concatenated)
// Every result has "id" and "error" (null, or the text of what the SDK threw).
//
// Values cross the process boundary as "xjson": JSON plus tagged objects for what JSON lacks:
//   {"$bigint": "123"}  {"$bytes": "hex"}  {"$identity": "hex"}  {"$connectionId": "hex"}
//   {"$timestamp": "micros"}  {"$timeDuration": "micros"}  {"$uuid": "8-4-4-4-12"}
//   {"$undefined": true}  {"$float": "NaN" | "Infinity" | "-Infinity" | "-0"}
import { ConnectionId, Identity, TimeDuration, Timestamp, Uuid, BinaryReader, BinaryWriter, t, api } from './sdk.mjs';

// --- xjson <-> JS values ------------------------------------------------------------------------

const hexOf = u8 => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString('hex');
const bytesOf = hex => new Uint8Array(Buffer.from(hex, 'hex'));

export function toX(v) {
  if (v === undefined) return { $undefined: true };
  if (v === null) return null;
  switch (typeof v) {
    case 'bigint':
      return { $bigint: v.toString() };
    case 'number':
      if (Number.isNaN(v)) return { $float: 'NaN' };
      if (!Number.isFinite(v)) return { $float: v > 0 ? 'Infinity' : '-Infinity' };
      if (Object.is(v, -0)) return { $float: '-0' };
      return v;
    case 'string':
    case 'boolean':
      return v;
    default:
      break;
  }
  if (v instanceof Uint8Array) return { $bytes: hexOf(v) };
  if (v instanceof Identity) return { $identity: v.toHexString() };
  if (v instanceof ConnectionId) return { $connectionId: v.toHexString() };
  if (v instanceof Timestamp) return { $timestamp: v.microsSinceUnixEpoch.toString() };
  if (v instanceof TimeDuration) return { $timeDuration: v.micros.toString() };
  if (v instanceof Uuid) return { $uuid: v.toString() };
  if (Array.isArray(v)) return v.map(toX);
  const proto = Object.getPrototypeOf(v);
  if (proto !== Object.prototype && proto !== null) {
    throw new TypeError(`toX: unexpected ${proto?.constructor?.name ?? 'object'} value`);
  }
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toX(x)]));
}

export function fromX(x) {
  if (x === null || typeof x !== 'object') return x;
  if (Array.isArray(x)) return x.map(fromX);
  const keys = Object.keys(x);
  if (keys.length === 1 && keys[0].startsWith('$')) {
    const s = x[keys[0]];
    switch (keys[0]) {
      case '$bigint':
        return BigInt(s);
      case '$bytes':
        return bytesOf(s);
      case '$identity':
        return Identity.fromString(s);
      case '$connectionId':
        return ConnectionId.fromString(s);
      case '$timestamp':
        return new Timestamp(BigInt(s));
      case '$timeDuration':
        return new TimeDuration(BigInt(s));
      case '$uuid':
        return Uuid.parse(s);
      case '$undefined':
        return undefined;
      case '$float':
        return s === '-0' ? -0 : Number(s);
      default:
        throw new TypeError(`fromX: unknown tag ${keys[0]}`);
    }
  }
  return Object.fromEntries(keys.map(k => [k, fromX(x[k])]));
}

// --- SATS-JSON -> SDK type builders -------------------------------------------------------------

const PRIMS = {
  Bool: () => t.bool(), String: () => t.string(),
  I8: () => t.i8(), U8: () => t.u8(), I16: () => t.i16(), U16: () => t.u16(),
  I32: () => t.i32(), U32: () => t.u32(), I64: () => t.i64(), U64: () => t.u64(),
  I128: () => t.i128(), U128: () => t.u128(), I256: () => t.i256(), U256: () => t.u256(),
  F32: () => t.f32(), F64: () => t.f64(),
};
const SPECIAL_PRODUCTS = {
  '__identity__/U256': () => t.identity(),
  '__connection_id__/U128': () => t.connectionId(),
  '__timestamp_micros_since_unix_epoch__/I64': () => t.timestamp(),
  '__time_duration_micros__/I64': () => t.timeDuration(),
  '__uuid__/U128': () => t.uuid(),
};
const nameOf = el => (el.name && 'some' in el.name ? el.name.some : undefined);
const tagOf = ty => Object.keys(ty)[0];
let typeCounter = 0;

export function builderFromSats(ty, top = false) {
  const tag = tagOf(ty);
  const body = ty[tag];
  if (tag in PRIMS) return PRIMS[tag]();
  if (tag === 'Array') return tagOf(body) === 'U8' ? t.byteArray() : t.array(builderFromSats(body));
  if (tag === 'Product') {
    const els = body.elements;
    if (els.length === 0) return t.unit();
    if (els.length === 1) {
      const special = SPECIAL_PRODUCTS[`${nameOf(els[0])}/${tagOf(els[0].algebraic_type)}`];
      if (special && !top) return special();
    }
    const fields = {};
    for (const el of els) {
      const name = nameOf(el);
      if (name === undefined) throw new TypeError('the SDK cannot express unnamed product fields');
      fields[name] = builderFromSats(el.algebraic_type);
    }
    return top ? t.row(fields) : t.object(`P${++typeCounter}`, fields);
  }
  if (tag === 'Sum') {
    const vs = body.variants;
    const names = vs.map(nameOf);
    if (names.length === 2 && names[0] === 'some' && names[1] === 'none') {
      return t.option(builderFromSats(vs[0].algebraic_type));
    }
    if (names.length === 2 && names[0] === 'ok' && names[1] === 'err') {
      return t.result(builderFromSats(vs[0].algebraic_type), builderFromSats(vs[1].algebraic_type));
    }
    const specialOf = v => {
      const p = v.algebraic_type.Product;
      return p && p.elements.length === 1 ? nameOf(p.elements[0]) : undefined;
    };
    if (
      names.length === 2 && names[0] === 'Interval' && names[1] === 'Time' &&
      specialOf(vs[0]) === '__time_duration_micros__' &&
      specialOf(vs[1]) === '__timestamp_micros_since_unix_epoch__'
    ) {
      return t.scheduleAt();
    }
    const isUnit = v => tagOf(v.algebraic_type) === 'Product' && v.algebraic_type.Product.elements.length === 0;
    if (vs.length > 0 && vs.every(isUnit)) return t.enum(`E${++typeCounter}`, names); // simple enum
    const variants = {};
    vs.forEach((v, i) => {
      if (names[i] === undefined) throw new TypeError('the SDK cannot express unnamed variants');
      variants[names[i]] = builderFromSats(v.algebraic_type);
    });
    return t.enum(`E${++typeCounter}`, variants);
  }
  throw new TypeError(`unsupported SATS type tag ${tag}`);
}

function codecOf(spec) {
  if (spec === 'ClientMessage') return api.ClientMessage;
  if (spec === 'ServerMessage') return api.ServerMessage;
  if (spec && typeof spec === 'object' && 'sats' in spec) return builderFromSats(spec.sats, true);
  throw new TypeError(`unknown codec ${JSON.stringify(spec)}`);
}

// --- ops ----------------------------------------------------------------------------------------

function encodeAll(codec, values) {
  const w = new BinaryWriter(1024);
  for (const v of values) codec.serialize(w, fromX(v));
  return hexOf(w.getBuffer());
}

const OPS = {
  decode(c, codec) {
    const r = new BinaryReader(bytesOf(c.hex));
    const decoded = codec.deserialize(r);
    const out = { value: toX(decoded), remaining: r.remaining, reencoded: null };
    if (c.reencode) {
      const w = new BinaryWriter(1024);
      codec.serialize(w, decoded);
      out.reencoded = hexOf(w.getBuffer());
    }
    return out;
  },
  encode(c, codec) {
    return { hex: encodeAll(codec, [c.value]) };
  },
  decode_many(c, codec) {
    const r = new BinaryReader(bytesOf(c.hex));
    const values = [];
    while (r.remaining > 0) values.push(toX(codec.deserialize(r)));
    return { values, remaining: r.remaining };
  },
  encode_many(c, codec) {
    return { hex: encodeAll(codec, c.values) };
  },
};

function runCase(c) {
  try {
    const op = OPS[c.op];
    if (!op) throw new TypeError(`unknown op ${c.op}`);
    return { id: c.id, error: null, ...op(c, codecOf(c.codec)) };
  } catch (e) {
    // The SDK sometimes throws plain strings.
    return { id: c.id, error: e instanceof Error ? `${e.name}: ${e.message}` : String(e) };
  }
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

const { cases } = JSON.parse(await readStdin());
process.stdout.write(JSON.stringify({ results: cases.map(runCase) }));

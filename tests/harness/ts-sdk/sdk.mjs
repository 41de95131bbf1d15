// One entry point for harness scripts (and bench/): everything the `spacetimedb` package exports,
// plus `api`, the SDK's v2 wire codec (ClientMessage, ServerMessage, BsatnRowList, ...) generated
// into build/ by setup.sh. Importing both from here guarantees a single SDK runtime: mixing the
// src and dist copies breaks BinaryReader's private fields (TS-SDK-NOTES.md §1).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export * from 'spacetimedb';

const generated = new URL('./build/client_api_types.mjs', import.meta.url);
if (!existsSync(fileURLToPath(generated))) {
  throw new Error(
    `${fileURLToPath(generated)} is missing: run tests/harness/ts-sdk/setup.sh first`
  );
}
export const api = await import(generated.href);

// A real Better Auth server on 127.0.0.1 for gatewayd's integration tests
// (tests/auth/test_better_auth.py): email + password, the jwt plugin (EdDSA by default, or
// ES256 with JWT_ALG=ES256), bearer and API-key plugins, SQLite through better-sqlite3.
//
// Env: DB_PATH (SQLite file, required), JWT_ALG (EdDSA | ES256), PORT (default 0: any free port).
// Prints one JSON line {"url": "http://127.0.0.1:<port>"} on stdout once it serves; logs to stderr.
// Stops on SIGTERM/SIGINT.
import http from "node:http";
import Database from "better-sqlite3";
import { betterAuth } from "better-auth";
import { bearer, jwt } from "better-auth/plugins";
import { toNodeHandler } from "better-auth/node";
import { getMigrations } from "better-auth/db/migration";
import { apiKey } from "@better-auth/api-key";

const alg = process.env.JWT_ALG || "EdDSA";
const keyPairConfig = alg === "ES256" ? { alg: "ES256" } : { alg: "EdDSA", crv: "Ed25519" };
const server = http.createServer();
await new Promise((resolve) => server.listen(Number(process.env.PORT || 0), "127.0.0.1", resolve));
const baseURL = `http://127.0.0.1:${server.address().port}`;

const auth = betterAuth({
  baseURL,
  secret: process.env.BETTER_AUTH_SECRET || "gatewayd-test-secret-0123456789abcdef0123456789",
  database: new Database(process.env.DB_PATH),
  emailAndPassword: { enabled: true, autoSignIn: true },
  trustedOrigins: [baseURL],
  // The app keeps the active tenant on the session (as the organization plugin's
  // activeOrganizationId does); its JWTs carry it as tenant_id.
  session: {
    additionalFields: {
      activeOrganizationId: { type: "string", required: false, defaultValue: "acme", input: false },
    },
  },
  plugins: [
    bearer(),
    jwt({
      jwks: { keyPairConfig },
      jwt: {
        definePayload: ({ user, session }) => ({
          id: user.id,
          email: user.email,
          tenant_id: session.activeOrganizationId ?? null,
        }),
      },
    }),
    apiKey(),
  ],
  telemetry: { enabled: false },
});
const { runMigrations } = await getMigrations(auth.options);
await runMigrations();

server.on("request", toNodeHandler(auth));
process.stdout.write(JSON.stringify({ url: baseURL, alg }) + "\n");
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => server.close(() => process.exit(0)));
}

// Hand-written module bindings for the dev peer's `demo` module, in the shape `spacetime generate`
// produces for TypeScript 2.x (templates/nodejs-ts/src/module_bindings/ upstream), as plain JS so
// plain `node` runs them. Only the tables and reducers the flow scripts use are declared: the SDK
// needs bindings for every table it receives rows of, nothing more.
//
// Names: `table({name})` is the wire table name, the schema key is the accessor (`conn.db.document`);
// row and params field order is the BSATN column/argument order; snake_case wire names are given
// with `.name()` as codegen does. Reducers are called as `conn.reducers.<camelCase(name)>`.
import {
  DbConnectionBuilder as __DbConnectionBuilder,
  DbConnectionImpl as __DbConnectionImpl,
  SubscriptionBuilderImpl as __SubscriptionBuilderImpl,
  convertToAccessorMap as __convertToAccessorMap,
  makeQueryBuilder as __makeQueryBuilder,
  procedures as __procedures,
  reducerSchema as __reducerSchema,
  reducers as __reducers,
  schema as __schema,
  t as __t,
  table as __table,
} from 'spacetimedb';

// --- document_table.ts, tenant_table.ts, canary_table.ts -----------------------------------------
const DocumentRow = __t.row({
  id: __t.u64().primaryKey(),
  tenantId: __t.string().name('tenant_id'),
  title: __t.string(),
  body: __t.string(),
  updatedAt: __t.timestamp().name('updated_at'),
  updatedBy: __t.identity().name('updated_by'),
});

const TenantRow = __t.row({
  id: __t.string().primaryKey(),
  name: __t.string(),
  createdAt: __t.timestamp().name('created_at'),
});

const CanaryRow = __t.row({
  name: __t.string().primaryKey(),
  counter: __t.u64(),
  updatedAt: __t.timestamp().name('updated_at'),
  updatedBy: __t.identity().name('updated_by'),
});

// --- *_reducer.ts ----------------------------------------------------------------------------------
const CreateDocumentReducer = {
  tenantId: __t.string().name('tenant_id'),
  title: __t.string(),
  body: __t.string(),
};
const UpdateDocumentReducer = { id: __t.u64(), title: __t.string(), body: __t.string() };
const DeleteDocumentReducer = { id: __t.u64() };
const BumpCanaryReducer = { name: __t.string() };

// --- index.ts ----------------------------------------------------------------------------------------
const tablesSchema = __schema({
  document: __table(
    {
      name: 'document',
      indexes: [
        { accessor: 'id', name: 'document_id_idx_btree', algorithm: 'btree', columns: ['id'] },
        { accessor: 'tenant_id', name: 'document_tenant_id_idx_btree', algorithm: 'btree', columns: ['tenantId'] },
      ],
      constraints: [{ name: 'document_id_key', constraint: 'unique', columns: ['id'] }],
    },
    DocumentRow
  ),
  tenant: __table(
    {
      name: 'tenant',
      indexes: [{ accessor: 'id', name: 'tenant_id_idx_btree', algorithm: 'btree', columns: ['id'] }],
      constraints: [{ name: 'tenant_id_key', constraint: 'unique', columns: ['id'] }],
    },
    TenantRow
  ),
  canary: __table(
    {
      name: 'canary',
      indexes: [{ accessor: 'name', name: 'canary_name_idx_btree', algorithm: 'btree', columns: ['name'] }],
      constraints: [{ name: 'canary_name_key', constraint: 'unique', columns: ['name'] }],
    },
    CanaryRow
  ),
});

const reducersSchema = __reducers(
  __reducerSchema('create_document', CreateDocumentReducer),
  __reducerSchema('update_document', UpdateDocumentReducer),
  __reducerSchema('delete_document', DeleteDocumentReducer),
  __reducerSchema('bump_canary', BumpCanaryReducer)
);

const proceduresSchema = __procedures();

const REMOTE_MODULE = {
  versionInfo: { cliVersion: '2.10.1' },
  tables: tablesSchema.schemaType.tables,
  reducers: reducersSchema.reducersType.reducers,
  ...proceduresSchema,
};

export const tables = __makeQueryBuilder(tablesSchema.schemaType);
export const reducers = __convertToAccessorMap(reducersSchema.reducersType.reducers);

export class SubscriptionBuilder extends __SubscriptionBuilderImpl {}

export class DbConnectionBuilder extends __DbConnectionBuilder {}

export class DbConnection extends __DbConnectionImpl {
  static builder = () => new DbConnectionBuilder(REMOTE_MODULE, config => new DbConnection(config));

  subscriptionBuilder = () => new SubscriptionBuilder(this);
}

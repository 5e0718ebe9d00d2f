-- Initial schema: operators, tenants (with quotas), tenant users, API keys, adapters and their
-- versions, the usage ledger, token-rate counters and concurrent-stream leases.
-- Every tenant-owned table carries tenant_id (first column of its main index) and cascades on
-- tenant deletion.

CREATE TABLE operators (
    id            uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Quotas are nullable columns: NULL means unlimited. They live on the tenant row so that quota
-- checks can lock that one row (SELECT ... FOR UPDATE) and stay atomic across replicas.
CREATE TABLE tenants (
    id                     uuid PRIMARY KEY,
    name                   text NOT NULL UNIQUE,
    created_at             timestamptz NOT NULL DEFAULT now(),
    max_adapters           bigint CHECK (max_adapters >= 0),
    max_adapter_bytes      bigint CHECK (max_adapter_bytes >= 0),
    max_concurrent_streams bigint CHECK (max_concurrent_streams >= 0),
    tokens_per_minute      bigint CHECK (tokens_per_minute >= 0),
    tokens_per_day         bigint CHECK (tokens_per_day >= 0)
);

CREATE TABLE tenant_users (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email         text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_users_tenant ON tenant_users (tenant_id);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    prefix       text NOT NULL UNIQUE,
    hash         bytea NOT NULL CHECK (octet_length(hash) = 32),
    label        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

-- An adapter is a name in a tenant's namespace. Deleting it sets deleted_at (the row stays so
-- usage history keeps its name); the name becomes free for a new adapter.
CREATE TABLE adapters (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);
CREATE UNIQUE INDEX adapters_tenant_live_name ON adapters (tenant_id, name) WHERE deleted_at IS NULL;
CREATE INDEX adapters_tenant ON adapters (tenant_id, name);

-- Versions are immutable once ready; a re-upload adds a version. status 'deleted' means the
-- blob may be gone; rows stay for the ledger.
CREATE TABLE adapter_versions (
    id             uuid PRIMARY KEY,
    adapter_id     uuid NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    version        integer NOT NULL CHECK (version >= 1),
    rank           integer NOT NULL CHECK (rank >= 1),
    alpha          double precision NOT NULL,
    target_modules text[] NOT NULL,
    dtype          text NOT NULL,
    size_bytes     bigint NOT NULL CHECK (size_bytes >= 0),
    sha256         text NOT NULL,
    blob_key       text NOT NULL,
    status         text NOT NULL DEFAULT 'ready' CHECK (status IN ('ready', 'deleted')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (adapter_id, version)
);
CREATE INDEX adapter_versions_tenant ON adapter_versions (tenant_id, status);
CREATE INDEX adapter_versions_blob ON adapter_versions (blob_key);

-- One row per finished request. adapter_version_id NULL is the base model.
CREATE TABLE usage_events (
    id                 bigserial PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    adapter_version_id uuid REFERENCES adapter_versions (id) ON DELETE CASCADE,
    request_id         text NOT NULL,
    prompt_tokens      integer NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens  integer NOT NULL CHECK (completion_tokens >= 0),
    started_at         timestamptz NOT NULL,
    finished_at        timestamptz NOT NULL,
    finish_reason      text NOT NULL
);
CREATE INDEX usage_events_tenant_finished ON usage_events (tenant_id, finished_at);

-- Token-rate accounting shared by all replicas: one row per tenant, window kind and window
-- start. Consumption is a conditional UPDATE ... RETURNING, so concurrent requests on any
-- replica can never push a window over its limit.
CREATE TABLE token_windows (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('minute', 'day')),
    window_start timestamptz NOT NULL,
    tokens       bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    PRIMARY KEY (tenant_id, kind, window_start)
);
CREATE INDEX token_windows_start ON token_windows (window_start);

-- Concurrent-stream permits. A lease expires unless renewed, so a crashed replica's streams
-- stop counting after the lease time.
CREATE TABLE stream_leases (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX stream_leases_tenant ON stream_leases (tenant_id, expires_at);

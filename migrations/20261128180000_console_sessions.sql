-- Console sessions and the failed-login throttle.
--
-- A session row is keyed by the SHA-256 of the cookie's random token, so a copy of this table
-- cannot be replayed as cookies. Exactly one of operator_id / user_id is set; a tenant user's
-- session also carries its tenant for cheap scoping. The CSRF token is the synchronizer token
-- every console form must echo.

CREATE TABLE console_sessions (
    token_hash   bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    operator_id  uuid REFERENCES operators (id) ON DELETE CASCADE,
    user_id      uuid REFERENCES tenant_users (id) ON DELETE CASCADE,
    tenant_id    uuid REFERENCES tenants (id) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CHECK ((operator_id IS NULL) <> (user_id IS NULL)),
    CHECK ((user_id IS NULL) = (tenant_id IS NULL))
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- One row per failed login, per throttle key (`email:<address>` and `ip:<address>`). Rows older
-- than the throttle window are pruned as new failures arrive.
CREATE TABLE console_login_failures (
    id        bigserial PRIMARY KEY,
    key       text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_login_failures_key ON console_login_failures (key, failed_at);

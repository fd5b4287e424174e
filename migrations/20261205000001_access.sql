-- Who may do what (see docs/SECURITY.md).
--
-- API tokens: opaque bearer secrets, stored only as their SHA-256 (a token is 32 random
-- bytes, so a fast hash is enough: there is nothing to guess). A token belongs to one tenant
-- with one role; it stops working when it expires or is revoked.
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL,
    tenant      text        NOT NULL,
    role        text        NOT NULL,
    secret_hash bytea       NOT NULL UNIQUE,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

-- The audit log: every mutating call, who made it, for which tenant, on what, and how it
-- ended. Written by the gateway after the call; read by admins, newest first.
CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL,
    subject   text        NOT NULL,
    tenant    text        NOT NULL,
    role      text        NOT NULL,
    action    text        NOT NULL,
    target    text        NOT NULL,
    outcome   text        NOT NULL,
    detail    text        NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log (tenant, id);

-- Listings are scoped to the caller's tenant: a page of one tenant's jobs or runs walks its
-- own ids instead of filtering every tenant's.
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);
CREATE INDEX pipeline_runs_tenant_id ON pipeline_runs (tenant, id DESC);

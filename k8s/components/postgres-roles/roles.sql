-- PingApp's Postgres roles (docs/security.md, "Postgres"). Run once per
-- database, as a superuser or the database's owner, whenever roles or
-- passwords change; it is idempotent:
--
--   psql -v ON_ERROR_STOP=1 -d pingapp \
--        -v owner=pingapp_owner   -v owner_password="$OWNER_PASSWORD" \
--        -v runtime=pingapp_recorder -v runtime_password="$RECORDER_PASSWORD" \
--        -f k8s/components/postgres-roles/roles.sql
--
-- owner:   owns the schema's tables; the recorder applies its migrations
--          as this role (--migrate-database-url, or `recorder
--          --migrate-only`). No other rights.
-- runtime: what the recorder reads and writes with (DATABASE_URL):
--          SELECT, INSERT, UPDATE and DELETE on the tables (UPDATE: packed
--          sample blocks and rollups are upserted), no DDL, no TRUNCATE.
--          Day partitions are made and dropped through the owner's two
--          SECURITY DEFINER functions (migration 0005). Default privileges
--          give it the same on every table a later migration (or those
--          functions) creates, so no migration lists grants.
\set ON_ERROR_STOP on

SELECT format('CREATE ROLE %I', :'owner')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('CREATE ROLE %I', :'runtime')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'runtime') \gexec
ALTER ROLE :"owner" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'owner_password';
ALTER ROLE :"runtime" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    NOINHERIT PASSWORD :'runtime_password';

-- Only these two (and superusers) may connect; nobody creates schemas or
-- temporary tables.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), :'owner', :'runtime') \gexec

-- The schema: the owner creates in it, the runtime role only uses it.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"runtime";

-- Tables made before the split (by one all-powerful role) become the
-- owner's, so its migrations may alter them.
SELECT format('ALTER TABLE public.%I OWNER TO %I', tablename, :'owner')
  FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'owner' \gexec

-- The runtime role's rights: on the tables there are, and on every table
-- and sequence the owner creates from now on.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"runtime";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
-- Except the migrations' own table: the runtime role only reads it (the
-- recorder takes the same rights back when its migrations create it).
SELECT format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public._sqlx_migrations FROM %I', :'runtime')
 WHERE to_regclass('public._sqlx_migrations') IS NOT NULL \gexec
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"runtime";

-- Day partitions of sample_blocks are created and dropped while the
-- recorder runs, by a role that may not run DDL (docs/security.md,
-- "Postgres"): these two functions run as their owner (the role that
-- applied this migration, the schema owner) and do exactly that and
-- nothing else. Tables they create belong to the owner, so the runtime
-- role's default privileges cover them. Only names of the form
-- sample_blocks_dYYYYMMDD are accepted, and only partitions of
-- sample_blocks are dropped.

CREATE FUNCTION pingapp_create_day_partition(name text, lo bigint, hi bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF name !~ '^sample_blocks_d[0-9]{8}$' OR hi <= lo THEN
        RAISE EXCEPTION 'not a day partition: % [%, %)', name, lo, hi;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I (LIKE sample_blocks INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    -- Blocks of that day waiting in the default partition move in first.
    EXECUTE format(
        'WITH moved AS (DELETE FROM sample_blocks_default '
        'WHERE block_start_us >= %s AND block_start_us < %s RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', lo, hi, name);
    EXECUTE format(
        'ALTER TABLE sample_blocks ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
        name, lo, hi);
END
$$;

CREATE FUNCTION pingapp_drop_day_partition(name text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF name !~ '^sample_blocks_d[0-9]{8}$' OR NOT EXISTS (
        SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'sample_blocks'::regclass AND c.relname = name) THEN
        RAISE EXCEPTION 'not a day partition of sample_blocks: %', name;
    END IF;
    EXECUTE format('DROP TABLE %I', name);
END
$$;

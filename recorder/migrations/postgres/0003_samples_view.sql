-- `samples`, the table of the first layout, as a read-only view over the
-- packed layout: every stored sample one row, for ad-hoc SQL, exports and
-- tools written against the first layout. It decodes blocks in PL/pgSQL
-- (recorder/src/store/block.rs has the format), so it is for inspection,
-- not for the API's queries.

-- One LEB128 varint of `data` at byte `pos`: its value and the next
-- position.
CREATE FUNCTION pingapp_varint(data bytea, pos integer, OUT value numeric, OUT next integer)
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    b integer;
    scale numeric := 1;
BEGIN
    value := 0;
    next := pos;
    LOOP
        b := get_byte(data, next);
        next := next + 1;
        value := value + (b & 127) * scale;
        EXIT WHEN b < 128;
        scale := scale * 128;
    END LOOP;
END $$;

-- The inverse of zigzag encoding.
CREATE FUNCTION pingapp_unzigzag(v numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN mod(v, 2) = 0 THEN div(v, 2) ELSE -div(v + 1, 2) END
$$;

-- The samples of one packed block, in (at_us, n) order.
CREATE FUNCTION pingapp_unpack(data bytea)
RETURNS TABLE (n bigint, seq bigint, at_us bigint, delay_ms double precision)
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    pos integer := 2;
    thousandths boolean;
    total numeric;
    r record;
    prev_at numeric := 0;
    prev_n numeric := -1;
    prev_seq numeric := -1;
    q numeric := 0;
    bits numeric;
    e integer;
    m numeric;
BEGIN
    IF get_byte(data, 0) <> 1 THEN
        RAISE EXCEPTION 'unknown sample block version %', get_byte(data, 0);
    END IF;
    thousandths := (get_byte(data, 1) & 1) = 1;
    r := pingapp_varint(data, pos); total := r.value; pos := r.next;
    FOR i IN 1..total LOOP
        r := pingapp_varint(data, pos); pos := r.next;
        prev_at := prev_at + pingapp_unzigzag(r.value);
        r := pingapp_varint(data, pos); pos := r.next;
        prev_n := prev_n + 1 + pingapp_unzigzag(r.value);
        r := pingapp_varint(data, pos); pos := r.next;
        IF r.value = 0 THEN
            seq := NULL;
        ELSE
            prev_seq := prev_seq + 1 + pingapp_unzigzag(r.value - 1);
            seq := prev_seq;
        END IF;
        IF thousandths THEN
            r := pingapp_varint(data, pos); pos := r.next;
            q := q + pingapp_unzigzag(r.value);
            delay_ms := q::double precision / 1000;
        ELSE
            bits := 0;
            FOR k IN REVERSE 7..0 LOOP
                bits := bits * 256 + get_byte(data, pos + k);
            END LOOP;
            pos := pos + 8;
            e := (div(bits, 2 ^ 52::numeric) % 2048)::integer;
            m := bits % (2 ^ 52::numeric);
            IF e = 2047 THEN
                delay_ms := CASE WHEN m = 0 THEN 'Infinity'::double precision ELSE 'NaN' END;
            ELSIF e = 0 THEN
                delay_ms := m::double precision * power(2::double precision, -1074);
            ELSE
                delay_ms := (2 ^ 52::numeric + m)::double precision * power(2::double precision, e - 1075);
            END IF;
            IF bits >= 2 ^ 63::numeric THEN
                delay_ms := -delay_ms;
            END IF;
        END IF;
        at_us := prev_at;
        n := prev_n;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE VIEW samples AS
    SELECT c.channel_name, s.n, s.seq, s.at_us, s.delay_ms, c.public
    FROM sample_staging s JOIN channels c ON c.id = s.channel_id
    UNION ALL
    SELECT c.channel_name, u.n, u.seq, u.at_us, u.delay_ms, c.public
    FROM sample_blocks b JOIN channels c ON c.id = b.channel_id
    CROSS JOIN LATERAL pingapp_unpack(b.data) u;

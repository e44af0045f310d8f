-- Several instances on one database: each serves the companies it holds a lease on.
-- Lease times are on the database server's clock (`jm_now_ms()`), one clock for every machine.

-- Every instance that ever used this database. Alive while expires_at is ahead and stopped_at
-- is NULL; a graceful stop sets stopped_at and releases its leases in the same transaction.
CREATE TABLE instances (
    name          text    PRIMARY KEY,           -- instance_name (default: host name and pid)
    incarnation   text    NOT NULL,              -- one process's run: a restart under the same
                                                 -- name is a new incarnation, holding nothing
    host          text    NOT NULL,
    pid           bigint  NOT NULL,
    version       text    NOT NULL,
    started_at    bigint  NOT NULL,
    heartbeat_at  bigint  NOT NULL,
    expires_at    bigint  NOT NULL,              -- heartbeat_at + company_lease_secs
    stopped_at    bigint
);

-- One row per company ever served. holder NULL: free. A lease is held while expires_at is
-- ahead; an expired one may be taken by any live instance.
CREATE TABLE company_leases (
    company_id   text    PRIMARY KEY,
    holder       text    REFERENCES instances (name),
    epoch        bigint  NOT NULL DEFAULT 0,     -- the fencing token: grows at every new holder
    acquired_at  bigint,
    expires_at   bigint  NOT NULL DEFAULT 0,
    changed_at   bigint  NOT NULL DEFAULT 0,     -- when the statement that last wrote it ran
    wanted_at    bigint  NOT NULL DEFAULT 0      -- when a live instance last listed it as served
);
CREATE INDEX company_leases_holder ON company_leases (holder, company_id);

-- The epoch only grows, by one, when a holder takes the lease (also the same holder again
-- after a release or an expiry); a new holder always comes with a new epoch. Every change of
-- holder is journaled in the same transaction.
CREATE FUNCTION jm_lease_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch <> OLD.epoch THEN
        IF NEW.epoch <> OLD.epoch + 1 OR NEW.holder IS NULL THEN
            RAISE EXCEPTION 'company_leases.epoch grows by one, when a holder takes the lease';
        END IF;
    ELSIF NEW.holder IS NOT NULL AND NEW.holder IS DISTINCT FROM OLD.holder THEN
        RAISE EXCEPTION 'a new holder takes a lease with a new epoch';
    END IF;
    IF NEW.holder IS DISTINCT FROM OLD.holder OR NEW.epoch <> OLD.epoch THEN
        IF OLD.holder IS NOT NULL AND NEW.holder IS DISTINCT FROM OLD.holder THEN
            INSERT INTO job_events (at, company_id, kind, detail)
            VALUES (NEW.changed_at, NEW.company_id, 'lease_released',
                    json_build_object('holder', OLD.holder, 'epoch', OLD.epoch,
                                      'expired', OLD.expires_at <= NEW.changed_at)::text);
        END IF;
        IF NEW.holder IS NOT NULL THEN
            INSERT INTO job_events (at, company_id, kind, detail)
            VALUES (NEW.changed_at, NEW.company_id, 'lease_taken',
                    json_build_object('holder', NEW.holder, 'epoch', NEW.epoch,
                                      'from', OLD.holder)::text);
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER company_leases_change BEFORE UPDATE ON company_leases
    FOR EACH ROW EXECUTE FUNCTION jm_lease_change();
CREATE FUNCTION jm_lease_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.holder IS NOT NULL OR NEW.epoch <> 0 THEN
        RAISE EXCEPTION 'a company lease starts free, at epoch 0';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER company_leases_insert BEFORE INSERT ON company_leases
    FOR EACH ROW EXECUTE FUNCTION jm_lease_insert();

-- For operators (psql): who holds what, and for how long yet.
CREATE VIEW leases AS
SELECT l.company_id,
       l.holder,
       l.epoch,
       jm_iso(l.expires_at) AS expires,
       (l.expires_at - jm_now_ms()) / 1000 AS seconds_left,
       (l.holder IS NULL OR l.expires_at <= jm_now_ms()) AS unheld,
       jm_iso(l.wanted_at) AS wanted
FROM company_leases l;

CREATE VIEW live_instances AS
SELECT i.name,
       i.host,
       i.pid,
       i.version,
       jm_iso(i.started_at) AS started,
       jm_iso(i.heartbeat_at) AS heartbeat,
       (jm_now_ms() - i.heartbeat_at) / 1000 AS heartbeat_age_seconds,
       (SELECT count(*) FROM company_leases l
         WHERE l.holder = i.name AND l.expires_at > jm_now_ms()) AS leases
FROM instances i
WHERE i.stopped_at IS NULL AND i.expires_at > jm_now_ms();

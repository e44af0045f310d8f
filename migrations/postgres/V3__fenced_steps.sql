-- Fencing, recorded: every step an instance takes for a company's job that changes something
-- at Pleo or hands items to a handler (the claim, a handler run, a batch of item reports, a
-- final event) is recorded here first, in a transaction of its own, with the instance and the
-- lease epoch it acted under. The insert is refused (SQLSTATE JM001) unless that instance holds
-- the company's lease at that epoch and the lease has not expired, and the lease row stays
-- share-locked until the transaction ends, so no takeover lands between the check and the
-- record. Every request is sent only after its row committed: a step without a row was never
-- taken, and the rows of a job show who did what under which epoch, in order.
CREATE TABLE fenced_steps (
    seq         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          bigint  NOT NULL,                  -- the database's clock, unless given
    company_id  text    NOT NULL,
    job_id      text    NOT NULL,
    step        text    NOT NULL CHECK (step IN ('claim', 'run', 'report', 'finish')),
    holder      text    NOT NULL,
    epoch       bigint  NOT NULL,
    detail      text    NOT NULL DEFAULT '{}' CHECK (detail::jsonb IS NOT NULL)
);
CREATE INDEX fenced_steps_job ON fenced_steps (job_id, seq);

CREATE FUNCTION jm_fenced_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.at := coalesce(NEW.at, jm_now_ms());
    PERFORM 1 FROM company_leases
      WHERE company_id = NEW.company_id AND holder = NEW.holder AND epoch = NEW.epoch
        AND expires_at > NEW.at
      FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'JM001',
            MESSAGE = format('%s does not hold the lease of company %s at epoch %s',
                             NEW.holder, NEW.company_id, NEW.epoch);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fenced_steps_check BEFORE INSERT ON fenced_steps
    FOR EACH ROW EXECUTE FUNCTION jm_fenced_step();
CREATE TRIGGER fenced_steps_no_update BEFORE UPDATE ON fenced_steps
    FOR EACH ROW EXECUTE FUNCTION jm_append_only();
CREATE TRIGGER fenced_steps_no_delete BEFORE DELETE ON fenced_steps
    FOR EACH ROW EXECUTE FUNCTION jm_append_only();
CREATE TRIGGER fenced_steps_no_truncate BEFORE TRUNCATE ON fenced_steps
    FOR EACH STATEMENT EXECUTE FUNCTION jm_append_only();

-- For operators (psql): the fenced steps, readable.
CREATE VIEW step_timeline AS
SELECT seq, jm_iso(at) AS at, company_id, job_id, step, holder, epoch, detail
FROM fenced_steps;

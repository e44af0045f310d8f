-- Instances sharing the database share its OAuth pairs (the default credential's and each
-- company's). The token endpoint rotates the refresh token at every refresh, so one process
-- refreshes a pair at a time: it holds the pair's refresh (`refresh_holder`) until it stored
-- the answer or `refresh_held_until` (the database's clock) passed; the others wait for the
-- new pair and use it. A hold that lapsed (its holder died or froze) may be taken by another.
ALTER TABLE oauth_tokens ADD COLUMN refresh_holder text;
ALTER TABLE oauth_tokens ADD COLUMN refresh_held_until bigint;

-- `hodei_search_text` ran a subquery (split, filter, DISTINCT) for each of a job's four texts,
-- and PostgreSQL starts an executor for a SQL function's subquery on every call: 30 µs of
-- each job's submission, about a tenth of PostgreSQL's time on the submission path.
-- `array_to_tsvector` sorts and removes duplicates itself, and a text of at most 256 bytes
-- cannot hold a token longer than that, so such texts (names, most labels and commands) are
-- split into an array without a subquery; only longer ones go through the filtering subquery,
-- now in its own function so that the short path never starts it. The vectors are the same
-- as before for every text, so the index and the stored rows stay valid.
CREATE FUNCTION hodei_search_tokens(t text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN array_to_tsvector(ARRAY(
           SELECT w FROM regexp_split_to_table(lower(t), '[\s"{}\[\],:;()=<>|&!''`*]+') AS w
           WHERE w <> '' AND octet_length(w) <= 256));

CREATE OR REPLACE FUNCTION hodei_search_text(t text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_tsvector('simple', t)
    || CASE WHEN octet_length(t) <= 256
            THEN array_to_tsvector(array_remove(
                     regexp_split_to_array(lower(t), '[\s"{}\[\],:;()=<>|&!''`*]+'), ''))
            ELSE hodei_search_tokens(t) END;

-- lvr datagen filter: the default QA filtering policy (DuckDB SQL). Edit a copy and pass it with
-- `--set filter.policy=my_policy.sql` (or `policy:` in the YAML); this file is then not used.
--
-- CONTRACT (what lvr/datagen/filter.py provides and expects)
--   Given, before this script runs:
--     qa_in(_ord BIGINT, <every qa_raw column>)   all input rows; _ord = 0..n-1 ordered by
--                                                   qa_id, then input file, then row ("first" = lowest _ord)
--     pass_rates_in(qa_id, passes, correct, pass_rate)  one row per qa_id (empty without a table)
--     embed_pairs(a_ord, b_ord, cosine)            within-video pairs with a_ord < b_ord whose sentence-
--                                                   embedding cosine >= embed_threshold (empty when off)
--     category_shares(category, share)            target shares (empty = no category caps)
--     getvariable('<key>') for every scalar FilterConfig key, plus 'use_pass_rates' (BOOLEAN).
--   Must create:
--     fates(_ord BIGINT, rule VARCHAR, reason VARCHAR, pass_rate DOUBLE, split VARCHAR)
--     exactly one row per input _ord. rule IS NULL = kept (split required), else rejected (reason
--     required). filter.py checks this and that kept + rejected == input, then writes the tables.
--
-- RULES, in order; a row is judged only by the rules before the first one it fails, so every row
-- has exactly one fate. Rules 1-5 look at one row; 6-8 look at the rows still alive.
--   1 generation_error  2 schema  3 duplicate_options  4 length  5 answer_leak
--   6 duplicate, near_duplicate  7 too_easy, too_hard, no_pass_rate  8 video_cap, category_cap
--   9 kept rows get a split (sft | rl | eval) from a hash of video_id: video-disjoint and stable
--     (split_by = 'rank': from the video's rank by that hash, exact fractions for small runs);
--     or, with split_by = 'folder', from the folder holding the video (rule `split` otherwise).

-- Normalized text: lower case, every run of non-letters/non-digits becomes one space, trimmed.
CREATE OR REPLACE TEMP MACRO lvr_norm(s) AS
    trim(regexp_replace(lower(coalesce(s, '')), '[^\pL\pN]+', ' ', 'g'));

-- Option letter of a 1-based index: 1 -> A.
CREATE OR REPLACE TEMP MACRO lvr_letter(i) AS chr((64 + i)::INTEGER);

-- Deterministic "random" order: rows with the lowest salted hash are kept by caps.
CREATE OR REPLACE TEMP MACRO lvr_rank_key(id) AS md5(getvariable('seed') || ':' || id);

CREATE OR REPLACE TEMP TABLE rejected (_ord BIGINT, rule VARCHAR, reason VARCHAR);

-- Rows not rejected yet (each rule below reads this view, so order matters).
CREATE OR REPLACE TEMP VIEW alive AS
    SELECT q.* FROM qa_in q ANTI JOIN rejected r USING (_ord);

-- ---------------------------------------------------------------------------------------------
-- Rules 1-5: one row at a time. Each rule is one column: NULL when the row passes, else a reason.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE TEMP TABLE row_view AS
SELECT
    _ord, qa_id, video_id, category, format, question, options, answer, error,
    coalesce(len(options), 0) AS n_opts,
    length(coalesce(reasoning, '')) AS r_len,  -- (the long reasoning text itself is not copied)
    NOT regexp_matches(coalesce(reasoning, ''), '\S') AS r_blank,
    lvr_norm(question) AS nq,
    list_transform(coalesce(options, []), lambda o: lvr_norm(o)) AS nopts,
    CASE WHEN format = 'mc' AND regexp_full_match(coalesce(answer, ''), '[A-Z]')
         THEN ascii(answer) - 64 END AS ans_idx,
    -- copies of one qa_id among non-error rows (shards written twice, merged runs)
    row_number() OVER (PARTITION BY qa_id, error IS NULL ORDER BY _ord) AS id_copy
FROM qa_in;

CREATE OR REPLACE TEMP TABLE row_checks AS
SELECT
    _ord,
    -- 1. the generator already failed on this row
    CASE WHEN error IS NOT NULL THEN 'generation error: ' || error END AS r_generation_error,
    -- 2. schema validity
    CASE
        WHEN qa_id IS NULL OR trim(qa_id) = '' THEN 'missing qa_id'
        WHEN id_copy > 1 THEN 'qa_id ' || qa_id || ' occurs more than once; the first copy is kept'
        WHEN video_id IS NULL OR trim(video_id) = '' THEN 'missing video_id'
        WHEN category IS NULL OR trim(category) = '' THEN 'missing category'
        WHEN question IS NULL OR trim(question) = '' THEN 'empty question'
        WHEN format IS NULL OR format NOT IN ('mc', 'open')
            THEN 'format ' || coalesce('''' || format || '''', 'NULL') || ' is neither mc nor open'
        WHEN format = 'mc' AND n_opts <> getvariable('mc_num_options')
            THEN 'mc question has ' || n_opts || ' options, expected '
                 || getvariable('mc_num_options')
        WHEN format = 'mc' AND list_bool_or(list_transform(options, lambda o: coalesce(trim(o), '') = ''))
            THEN 'option ' || lvr_letter(list_position(
                     list_transform(options, lambda o: coalesce(trim(o), '') = ''), true))
                 || ' is empty'
        WHEN format = 'mc' AND (ans_idx IS NULL OR ans_idx > n_opts)
            THEN 'mc answer ' || coalesce('''' || answer || '''', 'NULL') || ' is not one of the letters A-'
                 || lvr_letter(n_opts)
        WHEN format = 'open' AND n_opts > 0 THEN 'open question has ' || n_opts || ' options'
        WHEN format = 'open' AND coalesce(trim(answer), '') = '' THEN 'open answer is empty'
    END AS r_schema,
    -- 3. options must differ after normalization (first repeated pair is named)
    CASE WHEN format = 'mc' AND list_unique(nopts) < n_opts THEN
        'options ' || lvr_letter(list_position(nopts, nopts[dup_at])) || ' and ' || lvr_letter(dup_at)
        || ' are the same after normalization (''' || nopts[dup_at] || ''')'
    END AS r_duplicate_options,
    -- 4. length bounds, in characters as stored (blank text: rule 2, or 'reasoning is blank')
    CASE
        WHEN q_len < getvariable('min_question_chars')
            THEN 'question has ' || q_len || ' chars (min ' || getvariable('min_question_chars') || ')'
        WHEN q_len > getvariable('max_question_chars')
            THEN 'question has ' || q_len || ' chars (max ' || getvariable('max_question_chars') || ')'
        WHEN format = 'mc' AND list_min(opt_lens) < getvariable('min_option_chars')
            THEN 'option ' || lvr_letter(list_position(opt_lens, list_min(opt_lens))) || ' has '
                 || list_min(opt_lens) || ' chars (min ' || getvariable('min_option_chars') || ')'
        WHEN format = 'mc' AND list_max(opt_lens) > getvariable('max_option_chars')
            THEN 'option ' || lvr_letter(list_position(opt_lens, list_max(opt_lens))) || ' has '
                 || list_max(opt_lens) || ' chars (max ' || getvariable('max_option_chars') || ')'
        WHEN format = 'open' AND length(answer) > getvariable('max_open_answer_chars')
            THEN 'open answer has ' || length(answer) || ' chars (max '
                 || getvariable('max_open_answer_chars') || ')'
        WHEN r_len < getvariable('min_reasoning_chars')
            THEN 'reasoning has ' || r_len || ' chars (min ' || getvariable('min_reasoning_chars') || ')'
        WHEN r_len > getvariable('max_reasoning_chars')
            THEN 'reasoning has ' || r_len || ' chars (max ' || getvariable('max_reasoning_chars') || ')'
        WHEN getvariable('min_reasoning_chars') > 0 AND r_blank THEN 'reasoning is blank'
    END AS r_length,
    -- 5. the question gives the answer away
    CASE
        WHEN format = 'mc' AND list_contains(q_letters, answer)
             AND len(list_filter(q_letters, lambda l: l <> answer)) = 0
            THEN 'the question contains the answer letter pattern (' || answer || ') and no other letter'
        WHEN format = 'mc' AND nopts[ans_idx] <> ''
             AND contains(' ' || nq || ' ', ' ' || nopts[ans_idx] || ' ')
             AND NOT list_bool_or(list_transform(range(1, n_opts + 1), lambda i:
                     i <> ans_idx AND nopts[i] <> '' AND contains(' ' || nq || ' ', ' ' || nopts[i] || ' ')))
            THEN 'the correct option ' || answer || ' (''' || nopts[ans_idx]
                 || ''') appears in the question and no distractor does'
        WHEN format = 'open' AND getvariable('leak_check_open')
             AND length(lvr_norm(answer)) >= getvariable('leak_min_chars')
             AND contains(' ' || nq || ' ', ' ' || lvr_norm(answer) || ' ')
            THEN 'the open answer (''' || lvr_norm(answer) || ''') appears in the question'
    END AS r_answer_leak
FROM (
    SELECT *,
        length(question) AS q_len,
        list_transform(coalesce(options, []), lambda o: length(coalesce(o, ''))) AS opt_lens,
        list_filter(range(1, n_opts + 1), lambda i: list_position(nopts, nopts[i]) < i)[1] AS dup_at,
        -- letters written like (B), [B] or "answer is B" inside the question
        list_concat(regexp_extract_all(question, '\(([A-Z])\)', 1),
                    regexp_extract_all(question, '\[([A-Z])\]', 1),
                    regexp_extract_all(question, '(?i:answer\s*(?:is|:))\s*\(?([A-Z])\b', 1)) AS q_letters
    FROM row_view
);

INSERT INTO rejected
SELECT _ord, rule, reason FROM (
    SELECT _ord,
        CASE WHEN r_generation_error IS NOT NULL THEN 'generation_error'
             WHEN r_schema IS NOT NULL THEN 'schema'
             WHEN r_duplicate_options IS NOT NULL THEN 'duplicate_options'
             WHEN r_length IS NOT NULL THEN 'length'
             WHEN r_answer_leak IS NOT NULL THEN 'answer_leak' END AS rule,
        coalesce(r_generation_error, r_schema, r_duplicate_options, r_length, r_answer_leak) AS reason
    FROM row_checks
) WHERE rule IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- Rule 6: duplicates. Exact: same normalized question in the same video (or anywhere, with
-- dedup_across_videos); the first row is kept. Near: token-set Jaccard >= near_dup_jaccard (or
-- an embedding cosine >= embed_threshold) with ANY earlier row of the same video that survived
-- exact dedup. Pairs are only formed inside a video: O(k^2) for k questions of one video.
-- ---------------------------------------------------------------------------------------------
INSERT INTO rejected
SELECT _ord, 'duplicate',
       'same normalized question as ' || first_id
       || CASE WHEN first_video <> video_id THEN ' (video ' || first_video || ')' ELSE '' END
FROM (
    SELECT a._ord, a.video_id,
        first_value(a.qa_id) OVER w AS first_id,
        first_value(a.video_id) OVER w AS first_video,
        first_value(a._ord) OVER w AS first_ord
    FROM alive a JOIN row_view v USING (_ord)
    WINDOW w AS (PARTITION BY CASE WHEN getvariable('dedup_across_videos') THEN '' ELSE a.video_id END,
                 v.nq ORDER BY a._ord)
) WHERE _ord <> first_ord;

-- One row per distinct token of each alive question; pairs are found by joining on shared tokens
-- inside a video, so pairs with nothing in common are never formed. Tokens and videos are joined
-- by their 64-bit hashes (integer joins are ~2x faster; a collision is a 2^-64 event).
CREATE OR REPLACE TEMP TABLE near_tokens AS
SELECT _ord, video_key, len(toks) AS n_tok, unnest(toks) AS tok
FROM (SELECT a._ord, hash(a.video_id) AS video_key,
             list_distinct(list_transform(string_split(v.nq, ' '), lambda t: hash(t))) AS toks
      FROM alive a JOIN row_view v USING (_ord)
      WHERE getvariable('near_dup_jaccard') IS NOT NULL);

CREATE OR REPLACE TEMP TABLE near_pairs AS
SELECT p.b_ord AS _ord, p.a_ord AS other_ord,
       'token Jaccard ' || printf('%.2f', p.jac) || ' with ' || q.qa_id AS why
FROM (
    SELECT a._ord AS a_ord, b._ord AS b_ord,
           count(*) / (any_value(a.n_tok) + any_value(b.n_tok) - count(*)) AS jac
    FROM near_tokens a JOIN near_tokens b
      ON a.video_key = b.video_key AND a.tok = b.tok AND a._ord < b._ord
     -- |A n B| / |A u B| <= min size / max size: pairs of very different sizes cannot pass
     AND least(a.n_tok, b.n_tok) >= getvariable('near_dup_jaccard') * greatest(a.n_tok, b.n_tok)
    GROUP BY a._ord, b._ord
) p JOIN qa_in q ON q._ord = p.a_ord
WHERE p.jac >= getvariable('near_dup_jaccard')
UNION ALL
SELECT e.b_ord, e.a_ord, 'embedding cosine ' || printf('%.2f', e.cosine) || ' with ' || q.qa_id
FROM embed_pairs e
JOIN alive q ON q._ord = e.a_ord
JOIN alive b ON b._ord = e.b_ord;

INSERT INTO rejected
SELECT _ord, 'near_duplicate', arg_min(why, other_ord) FROM near_pairs GROUP BY _ord;

-- ---------------------------------------------------------------------------------------------
-- Rule 7: difficulty from pass rates (K sampled answers per question by the base model). GRPO
-- learns nothing from a group whose answers all score the same, so keep min < pass_rate < max.
-- ---------------------------------------------------------------------------------------------
INSERT INTO rejected
SELECT a._ord,
    CASE WHEN p.pass_rate IS NULL THEN 'no_pass_rate'
         WHEN p.pass_rate >= getvariable('pass_rate_max') THEN 'too_easy'
         ELSE 'too_hard' END,
    CASE WHEN p.pass_rate IS NULL THEN 'no pass rate for this qa_id in the pass_rates table'
         ELSE 'pass rate ' || printf('%.3f', p.pass_rate) || ' (' || p.correct || '/' || p.passes
              || ' correct) is ' || CASE WHEN p.pass_rate >= getvariable('pass_rate_max')
                                         THEN '>= max ' || getvariable('pass_rate_max')
                                         ELSE '<= min ' || getvariable('pass_rate_min') END
    END
FROM alive a LEFT JOIN pass_rates_in p USING (qa_id)
WHERE getvariable('use_pass_rates') AND (
    (p.pass_rate IS NULL AND getvariable('missing_pass_rate') = 'reject')
    OR p.pass_rate >= getvariable('pass_rate_max')
    OR p.pass_rate <= getvariable('pass_rate_min'));

-- ---------------------------------------------------------------------------------------------
-- Rule 8a: at most max_per_video questions per video (lowest salted hash of qa_id kept).
-- ---------------------------------------------------------------------------------------------
INSERT INTO rejected
SELECT _ord, 'video_cap',
       'video ' || video_id || ' has ' || n || ' questions left; the cap keeps '
       || getvariable('max_per_video') || ' (chosen by hash of qa_id)'
FROM (
    SELECT _ord, video_id, count(*) OVER w AS n, row_number() OVER (w ORDER BY lvr_rank_key(qa_id), _ord) AS k
    FROM alive WINDOW w AS (PARTITION BY video_id)
) WHERE getvariable('max_per_video') IS NOT NULL AND k > getvariable('max_per_video');

-- ---------------------------------------------------------------------------------------------
-- Rule 8b: category caps toward target shares. A category without a target share is rejected.
-- Shares are renormalized over the categories present. With a level L, category c keeps
-- min(n_c, t_c * L) rows; the largest L is chosen such that no category's realised share exceeds
-- t_c * (1 + category_share_tolerance). Tolerance 0 gives exact proportions (the scarcest category
-- limits all); a positive tolerance keeps more rows when one category is short. Found by walking
-- the breakpoints L = n_c / t_c in order (the excess share is concave in L).
-- ---------------------------------------------------------------------------------------------
INSERT INTO rejected
SELECT a._ord, 'category_cap',
       'category ''' || a.category || ''' has no target share (targets: '
       || (SELECT string_agg(category || '=' || share, ', ' ORDER BY category)
           FROM category_shares WHERE share > 0) || ')'
FROM alive a
WHERE (SELECT count(*) FROM category_shares) > 0
  AND a.category NOT IN (SELECT category FROM category_shares WHERE share > 0);

CREATE OR REPLACE TEMP TABLE category_quota AS
WITH counts AS (
    SELECT a.category, count(*) AS n, any_value(s.share) AS share
    FROM alive a JOIN category_shares s USING (category) GROUP BY a.category
), targets AS (
    SELECT category, n, share / sum(share) OVER () AS t, n / (share / sum(share) OVER ()) AS b
    FROM counts
), segments AS (  -- between breakpoints, categories before this one are saturated (keep all)
    SELECT *,
        coalesce(sum(n) OVER (ORDER BY b, category ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS s_sat,
        sum(t) OVER (ORDER BY b, category ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING) AS t_open
    FROM targets
), level AS (  -- first breakpoint where the share constraint fails; solve inside its segment
    SELECT coalesce(
        (SELECT (1 + tol) * s_sat / (1 - (1 + tol) * t_open)
         FROM segments, (SELECT getvariable('category_share_tolerance') AS tol)
         WHERE (1 + tol) * (s_sat + b * t_open) - b < -1e-9 * greatest(b, 1)
         ORDER BY b, category LIMIT 1),
        'infinity'::DOUBLE) AS level
)
SELECT category, n, t, floor(least(n, t * level) + 1e-9)::BIGINT AS quota FROM targets, level;

INSERT INTO rejected
SELECT _ord, 'category_cap',
       'category ''' || category || ''' keeps ' || quota || ' of ' || n
       || ' rows to approach its target share ' || printf('%.3f', t) || ' (chosen by hash of qa_id)'
FROM (
    SELECT a._ord, a.category, q.quota, q.n, q.t,
           row_number() OVER (PARTITION BY a.category ORDER BY lvr_rank_key(a.qa_id), a._ord) AS k
    FROM alive a JOIN category_quota q USING (category)
) WHERE k > quota;

-- ---------------------------------------------------------------------------------------------
-- Rule 9: video-disjoint splits. u = salted hash of video_id in [0, 1): the same video always
-- lands in the same split, whatever else is in the run.
-- ---------------------------------------------------------------------------------------------
-- With split_by = 'folder' the folder holding the video file names the split (sft | rl | eval):
-- a dataset's own splits; a kept row whose video sits elsewhere is rejected here, with why.
INSERT INTO rejected
SELECT a._ord, 'split',
       'video is not in an sft/, rl/ or eval/ folder (filter.split_by=folder): ' || a.video_path
FROM alive a
WHERE getvariable('split_by') = 'folder'
  AND regexp_extract(coalesce(a.video_path, ''), '[/\\](sft|rl|eval)[/\\][^/\\]+$', 1) = '';

-- With split_by = 'rank' u is replaced by the video's rank among the kept videos, ordered by the
-- same hash, (r + 0.5) / n: the fractions hold as closely as n videos allow (a split with a
-- share of at least 1/n never ends up empty), but adding videos can move others.
CREATE OR REPLACE TEMP TABLE video_u AS
SELECT video_id, u,
       (row_number() OVER (ORDER BY u, video_id) - 0.5) / count(*) OVER () AS rank_u
FROM (SELECT DISTINCT video_id,
             md5_number_lower(getvariable('seed') || ':' || video_id)::DOUBLE / 18446744073709551616.0 AS u
      FROM qa_in WHERE _ord NOT IN (SELECT _ord FROM rejected));

CREATE OR REPLACE TEMP TABLE fates AS
SELECT q._ord, r.rule, r.reason, p.pass_rate,
    CASE WHEN r.rule IS NOT NULL THEN NULL
         WHEN getvariable('split_by') = 'folder' THEN folder
         WHEN u < getvariable('split_sft') THEN 'sft'
         WHEN u < getvariable('split_sft') + getvariable('split_rl') THEN 'rl'
         ELSE 'eval' END AS split
FROM (SELECT qa._ord, qa.qa_id,
             CASE WHEN getvariable('split_by') = 'rank' THEN v.rank_u ELSE v.u END AS u,
             regexp_extract(coalesce(qa.video_path, ''), '[/\\](sft|rl|eval)[/\\][^/\\]+$', 1) AS folder
      FROM qa_in qa LEFT JOIN video_u v USING (video_id)) q
LEFT JOIN rejected r USING (_ord)
LEFT JOIN pass_rates_in p USING (qa_id);

-- The platform's ready-made score queries: DuckDB table macros over the analytics views `scores`, `subsets` and
-- `duplicates` (ca_platform/analytics/database.py), installed by ca_platform.analytics.queries.install_macros.
--
-- Format, which score_queries.py parses: every macro is one `CREATE OR REPLACE MACRO name(params) AS TABLE`
-- statement ending with a line that ends in `;`, directly preceded by `--` lines that say what it returns
-- (its description for `describe_macros`). Parameter names must differ from every column name the body
-- can see: DuckDB resolves a macro parameter before a column of the same name.
-- Use: SELECT * FROM score_histogram('reward_model', 'v1', bins := 40);

-- Pairs per equal-width score bin of one scorer's model version, between its lowest and highest score:
-- bin (0-based), lower_edge, upper_edge, pairs. Every bin is present, empty ones with 0; a bin holds
-- lower_edge <= score < upper_edge, and the highest score falls in the last bin (numpy.histogram's rule,
-- with the same edges and counts). One distinct score: bins span score - 0.5 to score + 0.5, as numpy's.
-- No row when the version has no scores.
CREATE OR REPLACE MACRO score_histogram(scorer_name, version, bins := 20) AS TABLE
WITH picked AS (
    SELECT score FROM scores
    WHERE scorer = scorer_name AND model_version = version AND score IS NOT NULL
),
bounds AS (
    SELECT
        CASE WHEN min(score) < max(score) THEN min(score) ELSE min(score) - 0.5 END AS low,
        CASE WHEN min(score) < max(score) THEN max(score) ELSE max(score) + 0.5 END AS high
    FROM picked
    HAVING count(*) > 0
),
checked AS (
    SELECT low, high,
        CASE WHEN bins >= 1 THEN CAST(bins AS BIGINT)
        ELSE error('score_histogram: bins must be at least 1, got ' || bins) END AS bin_count
    FROM bounds
),
grid AS (
    SELECT low, high, bin_count, (high - low) / bin_count AS width FROM checked
),
edges AS (
    SELECT
        bin,
        low + bin * width AS lower_edge,
        CASE WHEN bin = bin_count - 1 THEN high ELSE low + (bin + 1) * width END AS upper_edge
    FROM (SELECT low, high, bin_count, width, unnest(range(bin_count)) AS bin FROM grid)
),
guessed AS (
    SELECT score, low, width, bin_count,
        least(greatest(CAST(floor((score - low) / width) AS BIGINT), 0), bin_count - 1) AS first_guess
    FROM picked, grid
),
placed AS (
    -- the floor() guess can be one bin off at an edge through rounding: correct it against the edges themselves
    SELECT
        first_guess
        - CASE WHEN score < low + first_guess * width AND first_guess > 0 THEN 1 ELSE 0 END
        + CASE WHEN first_guess < bin_count - 1 AND score >= low + (first_guess + 1) * width THEN 1 ELSE 0 END
        AS bin
    FROM guessed
),
counted AS (
    SELECT bin, count(*) AS pairs FROM placed GROUP BY bin
)
SELECT edges.bin, edges.lower_edge, edges.upper_edge, coalesce(counted.pairs, 0) AS pairs
FROM edges LEFT JOIN counted ON counted.bin = edges.bin
ORDER BY edges.bin;

-- Score distribution of one scorer per model_version and shard, plus one row per model_version with
-- shard '(all)': pairs, mean, p05, p25, p50, p75, p95 (exact, linearly interpolated: quantile_cont), min,
-- max. Ordered by model_version, then the shards, then '(all)'.
CREATE OR REPLACE MACRO score_quantiles(scorer_name) AS TABLE
WITH summary AS (
    SELECT
        model_version,
        CASE WHEN grouping(shard) = 1 THEN '(all)' ELSE shard END AS shard,
        grouping(shard) AS is_total,
        count(*) AS pairs,
        avg(score) AS mean,
        quantile_cont(score, [0.05, 0.25, 0.5, 0.75, 0.95]) AS cuts,
        min(score) AS min,
        max(score) AS max
    FROM scores
    WHERE scorer = scorer_name
    GROUP BY GROUPING SETS ((model_version, shard), (model_version))
)
SELECT
    model_version, shard, pairs, mean,
    cuts[1] AS p05, cuts[2] AS p25, cuts[3] AS p50, cuts[4] AS p75, cuts[5] AS p95,
    min, max
FROM summary
ORDER BY model_version, is_total, shard;

-- How each pair's score moved between two model versions of one scorer, for the pairs (uid, shard) both
-- scored: uid, shard, old_score, new_score, shift (new - old), old_rank, new_rank. A rank is the pair's
-- place within its whole version, 1 = best, in the order compression cuts in (score descending, then uid,
-- then shard), so a top-k cut of that version keeps exactly the pairs with rank <= k. Ordered by new_rank.
CREATE OR REPLACE MACRO score_shift(scorer_name, old_version, new_version) AS TABLE
WITH ranked AS (
    SELECT uid, shard, model_version, score,
        row_number() OVER (PARTITION BY model_version ORDER BY score DESC NULLS LAST, uid, shard) AS place
    FROM scores
    WHERE scorer = scorer_name AND model_version IN (old_version, new_version)
),
old_ranked AS (SELECT uid, shard, score, place FROM ranked WHERE model_version = old_version),
new_ranked AS (SELECT uid, shard, score, place FROM ranked WHERE model_version = new_version)
SELECT
    old_ranked.uid, old_ranked.shard,
    old_ranked.score AS old_score, new_ranked.score AS new_score, new_ranked.score - old_ranked.score AS shift,
    old_ranked.place AS old_rank, new_ranked.place AS new_rank
FROM old_ranked JOIN new_ranked ON new_ranked.uid = old_ranked.uid AND new_ranked.shard = old_ranked.shard
ORDER BY new_rank;

-- One row comparing two model versions of one scorer: pairs_both (scored by both), only_old, only_new,
-- mean_shift, mean_abs_shift, min_shift, max_shift (new - old, over pairs_both), score_correlation (Pearson
-- of the scores), rank_correlation (Spearman: Pearson of the ranks among pairs_both, ties broken by uid and
-- shard as compression breaks them).
CREATE OR REPLACE MACRO score_shift_summary(scorer_name, old_version, new_version) AS TABLE
WITH old_scores AS (
    SELECT uid, shard, score FROM scores WHERE scorer = scorer_name AND model_version = old_version
),
new_scores AS (
    SELECT uid, shard, score FROM scores WHERE scorer = scorer_name AND model_version = new_version
),
presence AS (
    SELECT
        count(*) FILTER (old_scores.uid IS NOT NULL AND new_scores.uid IS NOT NULL) AS pairs_both,
        count(*) FILTER (new_scores.uid IS NULL) AS only_old,
        count(*) FILTER (old_scores.uid IS NULL) AS only_new
    FROM old_scores FULL OUTER JOIN new_scores
        ON new_scores.uid = old_scores.uid AND new_scores.shard = old_scores.shard
),
common AS (
    SELECT
        old_scores.score AS old_score,
        new_scores.score AS new_score,
        row_number() OVER (ORDER BY old_scores.score DESC NULLS LAST, old_scores.uid, old_scores.shard) AS old_place,
        row_number() OVER (ORDER BY new_scores.score DESC NULLS LAST, new_scores.uid, new_scores.shard) AS new_place
    FROM old_scores JOIN new_scores ON new_scores.uid = old_scores.uid AND new_scores.shard = old_scores.shard
),
moves AS (
    SELECT
        avg(new_score - old_score) AS mean_shift,
        avg(abs(new_score - old_score)) AS mean_abs_shift,
        min(new_score - old_score) AS min_shift,
        max(new_score - old_score) AS max_shift,
        corr(old_score, new_score) AS score_correlation,
        corr(old_place, new_place) AS rank_correlation
    FROM common
)
SELECT * FROM presence, moves;

-- Kept and dropped pairs of every compressed subset per shard: variant, model_version, keep_fraction,
-- shard, pairs, kept, dropped, kept_fraction (kept / pairs); plus one row per variant, model_version and
-- keep_fraction with shard '(all)' after its shards.
CREATE OR REPLACE MACRO subset_counts() AS TABLE
SELECT
    variant, model_version, keep_fraction,
    CASE WHEN grouping(shard) = 1 THEN '(all)' ELSE shard END AS shard,
    count(*) AS pairs,
    count(*) FILTER (kept) AS kept,
    count(*) FILTER (NOT kept) AS dropped,
    count(*) FILTER (kept) / count(*) AS kept_fraction
FROM subsets
GROUP BY GROUPING SETS ((variant, model_version, keep_fraction, shard), (variant, model_version, keep_fraction))
ORDER BY variant, model_version, keep_fraction, grouping(shard), shard;

-- Where each compressed subset's global cut lies: variant, model_version, keep_fraction, pairs, kept,
-- lowest_kept_score, highest_dropped_score (equal only when the cut splits tied scores).
CREATE OR REPLACE MACRO subset_cuts() AS TABLE
SELECT
    variant, model_version, keep_fraction,
    count(*) AS pairs,
    count(*) FILTER (kept) AS kept,
    min(score) FILTER (kept) AS lowest_kept_score,
    max(score) FILTER (NOT kept) AS highest_dropped_score
FROM subsets
GROUP BY variant, model_version, keep_fraction
ORDER BY variant, model_version, keep_fraction;

-- Every scorer and model version with scores, to find version ids: scorer, model_version, pairs, shards,
-- mean, min, max of its scores.
CREATE OR REPLACE MACRO score_versions() AS TABLE
SELECT
    scorer, model_version,
    count(*) AS pairs,
    count(DISTINCT shard) AS shards,
    avg(score) AS mean,
    min(score) AS min,
    max(score) AS max
FROM scores
GROUP BY scorer, model_version
ORDER BY scorer, model_version;

-- The largest duplicate groups of the current deduplication (view `duplicates`): group_id, representative_uid,
-- images (the representative included), exact, near and semantic members, and the largest distance to the
-- representative in pHash bits among near members; largest groups first, ties by group_id.
CREATE OR REPLACE MACRO largest_duplicate_groups(top := 10) AS TABLE
SELECT group_id, any_value(representative_uid) AS representative_uid, count(*) AS images,
    count(*) FILTER (WHERE kind = 'exact') AS exact, count(*) FILTER (WHERE kind = 'near') AS near,
    count(*) FILTER (WHERE kind = 'semantic') AS semantic,
    max(distance) FILTER (WHERE kind = 'near') AS max_near_bits
FROM duplicates
GROUP BY group_id
ORDER BY images DESC, group_id
LIMIT top;

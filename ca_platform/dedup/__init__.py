"""Image deduplication and evaluation-set decontamination of a downloaded pool, before any cut.

`fingerprints` computes each image's pixel hash, pHash and embedding (a per-shard map); `groups` turns a pool's
fingerprints into duplicate groups, each kept through its best-scored image, and removes the pool images that
copy an evaluation image. The searches behind them (`hamming_search`, `embedding_search`) avoid comparing every
pair, so they scale with the pool. Nothing is imported here: the Dagster definitions import `pool` when they
load, and scipy, torch and the searches only when dedup runs.
"""

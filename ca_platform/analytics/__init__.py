"""Score analytics in DuckDB: views over the parquet the runs write, ready-made queries, plots.

The database API is re-exported here, so callers write `analytics.query(...)`, `analytics.ensure_views(...)`.
"""

from ca_platform.analytics.database import QueryResult, ensure_views, mirror, query

__all__ = ["QueryResult", "ensure_views", "mirror", "query"]

"""Ingest: pool shards read and validated, downloaded through the guard into webdataset tars, checked."""

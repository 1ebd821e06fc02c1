"""The demo's embedded world: shapes pool, simulated annotators, evaluation set, image server."""

"""The Dagster instance's configuration, `DAGSTER_HOME/dagster.yaml`: the one place that writes it.

SQLite, Dagster's default, serialises writers: past a handful of runs at once (a backfill of many shards) runs
fail on "database is locked". With `CA_DAGSTER_PG_URL` set the instance keeps its runs, event logs and
schedules in PostgreSQL (dagster-postgres) instead, which takes many concurrent writers. Either way the run
queue caps how many runs go at once, since every run is a process on the daemon's machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

PG_URL_ENV = "CA_DAGSTER_PG_URL"
PG_URL_FORM = "postgresql+psycopg2://user:password@host:port/db"
# Dagster's own default; SQLite gets far fewer, as more writers than that is where it starts to lock.
POSTGRES_MAX_CONCURRENT_RUNS = 10
SQLITE_MAX_CONCURRENT_RUNS = 4
_HEADER = (
    "# Written by `ca-platform instance init` (make writes it before `demo` and `ui`): change it there, through\n"
    f"# {PG_URL_ENV} and --max-concurrent-runs, or point DAGSTER_HOME at a folder of your own.\n"
)


class InstanceConfigError(ValueError):
    """The settings cannot configure an instance; a message never repeats the password."""


def check_pg_url(pg_url: str) -> None:
    """Refuse a URL Dagster would only fail on later, in the daemon or a run, far from the setting.

    SQLAlchemy 2.1 reads a bare `postgresql://` with psycopg 3, while dagster-postgres installs psycopg2: the
    driver is checked by asking SQLAlchemy for it, so the URL works whichever of the two is installed.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(pg_url)
        dialect = url.get_dialect()
    except (ArgumentError, ValueError):  # their messages may hold the URL, password and all
        raise InstanceConfigError(f"{PG_URL_ENV} is not a PostgreSQL URL: use {PG_URL_FORM}") from None
    if dialect.name != "postgresql":
        raise InstanceConfigError(f"{PG_URL_ENV} must be a PostgreSQL URL, not {url.drivername}: use {PG_URL_FORM}")
    try:
        dialect.import_dbapi()
    except ImportError:
        raise InstanceConfigError(
            f"{PG_URL_ENV} names {url.drivername}://, whose driver {url.get_driver_name()} is not installed: use "
            f"{PG_URL_FORM} (dagster-postgres installs psycopg2)"
        ) from None
    if not url.host or not url.username or not url.database:
        raise InstanceConfigError(f"{PG_URL_ENV} must name a user, a host and a database: {PG_URL_FORM}")


def instance_config(pg_url: str | None, max_concurrent_runs: int | None = None) -> dict[str, object]:
    """The dagster.yaml content: PostgreSQL storage when `pg_url` is given, SQLite otherwise.

    The URL itself is not written: `postgres_url: {env: CA_DAGSTER_PG_URL}` keeps the password out of the file,
    so every process that opens the instance (daemon, UI, runs, `ca-platform shards register`) needs the variable.
    """
    limit = max_concurrent_runs
    if limit is None:
        limit = POSTGRES_MAX_CONCURRENT_RUNS if pg_url else SQLITE_MAX_CONCURRENT_RUNS
    if limit < 1:
        raise InstanceConfigError(f"max_concurrent_runs must be at least 1, not {limit}")
    config: dict[str, object] = {"telemetry": {"enabled": False}}
    if pg_url:
        check_pg_url(pg_url)
        config["storage"] = {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    config["run_queue"] = {"max_concurrent_runs": limit}
    return config


def write_instance_config(dagster_home: Path, pg_url: str | None, max_concurrent_runs: int | None = None) -> Path:
    """Write `dagster_home/dagster.yaml` (see `instance_config`) and return its path; the file is replaced whole."""
    config = instance_config(pg_url, max_concurrent_runs)
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(_HEADER + yaml.safe_dump(config, sort_keys=False))
    staged.replace(path)  # a daemon reading the file never sees half of it
    return path

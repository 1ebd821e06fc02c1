"""The Dagster instance's configuration, `DAGSTER_HOME/dagster.yaml`: the one place that writes it.

SQLite, Dagster's default, serialises writers: past a handful of runs at once (a backfill of many shards) runs
fail on "database is locked". With `CA_DAGSTER_PG_URL` set the instance keeps its runs, event logs and
schedules in PostgreSQL (dagster-postgres) instead, which takes many concurrent writers. The run queue caps how
many runs go at once. By default every run is a process on the daemon's machine; with `CA_RAY_JOBS_ADDRESS`
set (a Ray cluster's job server, http://head:8265) dagster-ray's RayRunLauncher submits each run as a Ray job,
so a backfill's per-shard runs spread over the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ca_platform import progress

PG_URL_ENV = "CA_DAGSTER_PG_URL"
PG_URL_FORM = "postgresql+psycopg2://user:password@host:port/db"
RAY_JOBS_ADDRESS_ENV = "CA_RAY_JOBS_ADDRESS"
# What a run needs on a cluster node besides the instance: the platform's settings (resources_from_env) and
# S3 credentials, passed from the daemon's environment to each Ray job.
RUN_ENV_VARS = (
    PG_URL_ENV,
    "CA_POOL_URI",
    "CA_DATA_URI",
    "CA_ALLOW_HOSTS",
    "CA_ANALYTICS_DIR",
    "CA_PREFERENCES_URI",
    "CA_PREFERENCE_IMAGE_ROOT",
    "CA_KEEP_FRACTION",
    "CA_EVAL_URI",
    "CA_CLIP_DIR",
    "CA_BLIP_DIR",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)
# Dagster's own default; SQLite gets far fewer, as more writers than that is where it starts to lock.
POSTGRES_MAX_CONCURRENT_RUNS = 10
SQLITE_MAX_CONCURRENT_RUNS = 4
_HEADER = (
    "# Written by `ca-platform instance init` (make writes it before `demo` and `ui`): change it there, through\n"
    f"# {PG_URL_ENV}, {RAY_JOBS_ADDRESS_ENV} and --max-concurrent-runs, or point DAGSTER_HOME at a folder\n"
    "# of your own.\n"
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


def instance_config(
    pg_url: str | None, max_concurrent_runs: int | None = None, ray_jobs_address: str | None = None
) -> dict[str, object]:
    """The dagster.yaml content: PostgreSQL storage when `pg_url` is given, SQLite otherwise; runs launched as Ray
    jobs when `ray_jobs_address` is given (which needs PostgreSQL: a run on another node cannot reach SQLite).

    The URL itself is not written: `postgres_url: {env: CA_DAGSTER_PG_URL}` keeps the password out of the file,
    so every process that opens the instance (daemon, UI, runs, `ca-platform shards register`) needs the variable.
    """
    limit = max_concurrent_runs
    if limit is None:
        limit = POSTGRES_MAX_CONCURRENT_RUNS if pg_url else SQLITE_MAX_CONCURRENT_RUNS
    if limit < 1:
        raise InstanceConfigError(f"max_concurrent_runs must be at least 1, not {limit}")
    config: dict[str, object] = {
        "telemetry": {"enabled": False},
        # long steps report how far they are on this logger: captured into each run's logs, shown in the UI
        "python_logs": {"managed_python_loggers": [progress.LOGGER_NAME], "python_log_level": "INFO"},
    }
    if pg_url:
        check_pg_url(pg_url)
        config["storage"] = {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    config["run_queue"] = {"max_concurrent_runs": limit}
    if ray_jobs_address:
        if not pg_url:
            raise InstanceConfigError(
                f"{RAY_JOBS_ADDRESS_ENV}: runs on Ray cluster nodes need an instance they can reach: set {PG_URL_ENV}"
            )
        config["run_launcher"] = {
            "module": "dagster_ray",
            "class": "RayRunLauncher",
            "config": {"ray": {"address": ray_jobs_address, "num_cpus": 1, "env_vars": list(RUN_ENV_VARS)}},
        }
    return config


def write_instance_config(
    dagster_home: Path, pg_url: str | None, max_concurrent_runs: int | None = None, ray_jobs_address: str | None = None
) -> Path:
    """Write `dagster_home/dagster.yaml` (see `instance_config`) and return its path; the file is replaced whole."""
    config = instance_config(pg_url, max_concurrent_runs, ray_jobs_address)
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(_HEADER + yaml.safe_dump(config, sort_keys=False))
    staged.replace(path)  # a daemon reading the file never sees half of it
    return path

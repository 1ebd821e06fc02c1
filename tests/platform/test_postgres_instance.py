"""The Dagster instance on a real PostgreSQL server on loopback: a daemon backfill of 8 shards, 4 runs at once.

SQLite's single writer is what breaks parallel runs ("database is locked"); this is the configuration that
`ca-platform instance init` writes when CA_DAGSTER_PG_URL is set, exercised as a user runs it: the shards
registered, a `dagster job backfill`, a `dagster-daemon` launching the queued runs, four at a time. Every run
is a few processes that each load the definitions, so on two cores this test takes minutes.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import psycopg2
import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, serialize_value

from ca_platform import cli, layout, schemas
from ca_platform.instance import (
    PG_URL_ENV,
    PG_URL_FORM,
    SQLITE_MAX_CONCURRENT_RUNS,
    InstanceConfigError,
    write_instance_config,
)
from tests.conftest import BIN, RoutesServer, _free_port, png_bytes, write_pool

REPO = Path(__file__).resolve().parents[2]

SHARDS = 4  # with the late one, five runs: more than MAX_CONCURRENT_RUNS, so the queue must hold one back
ROWS = 6
MAX_CONCURRENT_RUNS = 4
LOCKED = "database is locked"


def _postgres_bin() -> Path | None:
    """The newest server of Debian's `postgresql` package (not on PATH there), else an initdb on PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: [int(n) for n in p.parts[-3].split(".")]
    )
    initdb = debian[-1] if debian else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_server_user(command: list[str | Path]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the package's `postgres` user."""
    argv = [str(part) for part in command]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (socket and data in a temp dir) with an empty database."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are absent (`make postgres` installs Debian's `postgresql`)")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        pytest.skip("running as root needs `runuser` and the `postgres` user (Debian's `postgresql` creates it)")
    root = Path(tempfile.mkdtemp(prefix="ca-pg-"))  # not under pytest's tmp_path, which only root may enter
    data, pwfile = root / "data", root / "pwfile"
    password = secrets.token_hex(8)
    pwfile.write_text(password)
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        for path in (root, pwfile):
            os.chown(path, server_user.pw_uid, server_user.pw_gid)
    pg_ctl = [bin_dir / "pg_ctl", "-D", data]
    try:
        subprocess.run(
            _as_server_user(
                [bin_dir / "initdb", "-D", data, "-U", "dagster", f"--pwfile={pwfile}", "-A", "scram-sha-256"]
                + ["-E", "UTF8", "--no-sync", "--no-instructions"]
            ),
            cwd=root,
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = _start_server(pg_ctl, root)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="dagster", password=password, dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE dagster")
        connection.close()
        yield f"postgresql+psycopg2://dagster:{password}@127.0.0.1:{port}/dagster"
    finally:
        if (data / "postmaster.pid").exists():
            stop = [*pg_ctl, "-m", "immediate", "-w", "stop"]
            subprocess.run(_as_server_user(stop), cwd=root, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _start_server(pg_ctl: list[str | Path], root: Path) -> int:
    """Start the server on a free loopback port (another process may take the port first: then another one)."""
    for _ in range(3):
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
        started = subprocess.run(
            _as_server_user([*pg_ctl, "-l", root / "server.log", "-w", "-t", "60", "-o", options, "start"]),
            cwd=root,
            capture_output=True,
            text=True,
            timeout=90,
        )
        if started.returncode == 0:
            return port
    log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
    raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{log[-3000:]}")


def test_sqlite_stays_the_default_with_a_run_queue_and_no_telemetry(tmp_path: Path) -> None:
    path = write_instance_config(tmp_path / "home", None)
    with DagsterInstance.from_config(str(path.parent)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == SQLITE_MAX_CONCURRENT_RUNS
        assert not instance.telemetry_enabled


def test_a_ray_jobs_address_makes_dagster_ray_launch_every_run_on_the_cluster(tmp_path: Path) -> None:
    """The written run launcher is one Dagster builds (its config validated by Dagster's own schema); without
    PostgreSQL it is refused, as nodes of a cluster cannot reach a SQLite file."""
    from dagster._config import process_config
    from dagster_ray import RayRunLauncher

    url = "postgresql+psycopg2://dagster:s3cret@db.internal:5433/dagster"
    path = write_instance_config(tmp_path / "home", url, ray_jobs_address="http://ray-head:8265")
    section = yaml.safe_load(path.read_text())["run_launcher"]
    assert (section["module"], section["class"]) == ("dagster_ray", "RayRunLauncher")
    processed = process_config(RayRunLauncher.config_type(), section["config"])
    assert processed.success, processed.errors
    launcher = RayRunLauncher.from_config_value(None, processed.value)
    assert launcher.address == "http://ray-head:8265" and PG_URL_ENV in launcher.env_vars
    with pytest.raises(InstanceConfigError, match=PG_URL_ENV):
        write_instance_config(tmp_path / "other", None, ray_jobs_address="http://ray-head:8265")


def test_init_refers_to_the_url_by_env_var_and_rewrites_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv(PG_URL_ENV, "postgresql+psycopg2://dagster:s3cret@db.internal:5433/dagster")
    assert cli.main(["instance", "init", "--dagster-home", str(home), "--max-concurrent-runs", "6"]) == 0
    assert "PostgreSQL" in capsys.readouterr().out
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert config["storage"] == {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    assert config["run_queue"] == {"max_concurrent_runs": 6}
    assert config["telemetry"] == {"enabled": False}
    assert "s3cret" not in (home / "dagster.yaml").read_text()

    monkeypatch.delenv(PG_URL_ENV)  # unset again: back to SQLite, same file
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert cli.main(["instance", "init"]) == 0
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert "storage" not in config
    assert config["run_queue"] == {"max_concurrent_runs": SQLITE_MAX_CONCURRENT_RUNS}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://dagster:s3cret@db/dagster", "must be a PostgreSQL URL"),
        ("postgres://dagster:s3cret@db/dagster", "not a PostgreSQL URL"),
        ("postgresql+psycopg2://dagster:s3cret@db:port/dagster", "not a PostgreSQL URL"),
        ("postgresql+psycopg2://dagster:s3cret@db:5432/", "must name a user, a host and a database"),
        ("postgresql+pg8000://dagster:s3cret@db/dagster", "driver pg8000 is not installed"),
    ],
)
def test_init_refuses_a_url_dagster_could_not_use_without_repeating_the_password(
    url: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PG_URL_ENV, url)
    assert cli.main(["instance", "init", "--dagster-home", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert says in error and PG_URL_FORM in error
    assert "s3cret" not in error
    assert not (tmp_path / "dagster.yaml").exists()


def _run(env: dict[str, str], *argv: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(a) for a in argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(*processes: subprocess.Popen, timeout_s: float = 300) -> list[str]:
    """Wait for commands started side by side (two cores: each loads Dagster); their output, all succeeded."""
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, f"{process.args}: {output[-3000:]}"
        outputs.append(output)
    return outputs


def _wait_for_code_server(env: dict[str, str], server: subprocess.Popen, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, "the code server exited"
        check = [BIN / "dagster", "api", "grpc-health-check", "-p", str(port), "-h", "127.0.0.1"]
        if subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0:
            return
        assert time.monotonic() < deadline, "the code server did not come up"
        time.sleep(2)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # its own session: the runs it started go with it
    process.wait(60)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most runs in progress at one moment, from their (start, end) times."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # ends sort first
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _wait_for_runs(
    instance: DagsterInstance, daemon: subprocess.Popen, daemon_log: Path, count: int, timeout_s: float = 600
) -> list:
    """The shard_spine run records once `count` runs exist and all have finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = instance.get_run_records(RunsFilter(job_name="shard_spine"))
        if len(records) == count and all(r.dagster_run.is_finished for r in records):
            return records
        assert daemon.poll() is None, f"the daemon exited: {daemon_log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"runs unfinished: {[r.dagster_run.status for r in records]}"
        time.sleep(2)


@pytest.mark.slow
def test_daemon_backfill_in_parallel_and_the_shard_sensor_on_a_postgres_instance(
    postgres_url: str, routes_server: RoutesServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes_server.delay_s = 4.0  # every image answers after 4 s, so the runs overlap however the daemon staggers them
    shards = {}
    for shard in range(SHARDS):
        images = {f"/img/{shard}-{row}.png": png_bytes(24, 20, seed=shard * 100 + row) for row in range(ROWS)}
        urls = [routes_server.add(path, body, Content_Type="image/png") for path, body in images.items()]
        shards[f"part-{shard:05d}"] = {"url": urls, "caption": [f"a picture {shard}-{row}" for row in range(ROWS)]}
    keys = sorted(shards)
    pool = write_pool(tmp_path / "pool", shards)
    data = tmp_path / "data"
    home = tmp_path / "dagster_home"
    write_instance_config(home, postgres_url, MAX_CONCURRENT_RUNS)
    assert urlsplit(postgres_url).password not in (home / "dagster.yaml").read_text()  # referred to by `env:`

    monkeypatch.setenv(PG_URL_ENV, postgres_url)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CA_POOL_URI": str(pool),
        "CA_DATA_URI": str(data),
        "CA_ALLOW_HOSTS": "127.0.0.1",
    }
    instance = DagsterInstance.from_config(str(home))  # creates the tables: processes started together would race
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"

    # One code server for the CLI and the daemon (the module workspace.yaml loads), so that the definitions,
    # seconds of imports, load once rather than in every command; the runs are its subprocesses.
    port = _free_port()
    grpc = ["--grpc-host", "127.0.0.1", "--grpc-port", str(port)]
    server_log, daemon_log = tmp_path / "code_server.log", tmp_path / "daemon.log"
    with server_log.open("w") as log:  # a file, not a pipe: the runs, its subprocesses, write there too
        server = subprocess.Popen(
            [BIN / "dagster", "api", "grpc", "-m", "ca_platform.definitions", "-d", REPO, "-h", "127.0.0.1"]
            + ["-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = None
    try:
        outputs = _finish(_run(env, BIN / "ca-platform", "shards", "register", "--pool", pool))
        _wait_for_code_server(env, server, port, timeout_s=180)
        outputs += _finish(_run(env, BIN / "dagster", "sensor", "stop", "automation_sensor", *grpc))
        backfill = ["job", "backfill", "-j", "shard_spine", "--partitions", ",".join(keys), "--noprompt", *grpc]
        outputs += _finish(_run(env, BIN / "dagster", *backfill))
        assert {r.dagster_run.status for r in instance.get_run_records()} == {DagsterRunStatus.QUEUED}

        # A shard added to the pool meanwhile: the shard sensor (on by default, evaluated by the daemon) requests
        # it alone, not the backfill's shards, which are not done yet but queued.
        late = "part-late"
        urls = [routes_server.add(f"/late/{row}.png", png_bytes(24, 20, seed=900 + row)) for row in range(ROWS)]
        shards[late] = {"url": urls, "caption": [f"a late picture {row}" for row in range(ROWS)]}
        write_pool(pool, {late: shards[late]})
        with daemon_log.open("w") as log:
            daemon = subprocess.Popen(
                [BIN / "dagster-daemon", "run", *grpc],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        records = _wait_for_runs(instance, daemon, daemon_log, SHARDS + 1)
    finally:
        for process in (daemon, server):
            if process is not None:
                _stop(process)

    runs = [r.dagster_run for r in records]
    assert sorted(run.tags["dagster/partition"] for run in runs) == [*keys, late]
    backfilled = [run for run in runs if "dagster/backfill" in run.tags]
    assert len(backfilled) == SHARDS and len({run.tags["dagster/backfill"] for run in backfilled}) == 1
    (sensed,) = [run for run in runs if "dagster/backfill" not in run.tags]
    assert sensed.tags["dagster/partition"] == late and sensed.tags["dagster/sensor_name"] == "pool_shard_sensor"
    failed = {run.tags["dagster/partition"]: run.status for run in runs if run.status != DagsterRunStatus.SUCCESS}
    assert not failed, failed
    assert _most_at_once([(r.start_time, r.end_time) for r in records]) == MAX_CONCURRENT_RUNS  # and no more

    events = [serialize_value(event) for run in runs for event in instance.all_logs(run.run_id)]
    captured = [path.read_text(errors="replace") for path in (home / "storage").rglob("*") if path.is_file()]
    assert events and captured
    for text in [*events, *captured, server_log.read_text(), daemon_log.read_text(), *outputs]:
        assert LOCKED not in text
    assert not list(home.rglob("*.db")), "something fell back to SQLite"
    instance.dispose()

    ledger = pl.concat([pl.read_parquet(data / layout.download_rows_key(shard)) for shard in shards])
    assert ledger.height == (SHARDS + 1) * ROWS
    expected = {(shard, row, url) for shard, columns in shards.items() for row, url in enumerate(columns["url"])}
    assert set(ledger.select(schemas.SHARD, schemas.ROW_INDEX, schemas.URL).iter_rows()) == expected
    assert ledger[schemas.STATUS].unique().to_list() == [schemas.Status.SUCCESS]

"""The command lines users run: dagster's CLI through workspace.yaml, and `ca-platform`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import yaml

from ca_platform import analytics, layout
from ca_platform.compression import DEMO_KEEP_FRACTIONS
from ca_platform.resources import DEFAULT_KEEP_FRACTION, build_resources
from ca_platform.runner import report, run_lineage
from tests.conftest import BIN, RoutesServer, cli_env

REPO = Path(__file__).resolve().parents[2]


def _workspace_module() -> tuple[str, str]:
    entry = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    return entry["module_name"], str(REPO / entry.get("working_directory", "."))


OPTIONAL_ENV = (
    "CA_ALLOW_HOSTS",
    "CA_ANALYTICS_DIR",
    "CA_PREFERENCES_URI",
    "CA_KEEP_FRACTION",
    "CA_EVAL_URI",
    "CA_EVAL_CLASSES_URI",
)


def test_dagster_and_ca_platform_run_build_the_same_resources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dagster import EnvVar

    from ca_platform.assets import ALL_ASSETS
    from ca_platform.resources import BaselineConfig, resources_from_env

    env = {
        "CA_POOL_URI": str(tmp_path / "pool"),
        "CA_DATA_URI": str(tmp_path / "data"),
        "CA_ALLOW_HOSTS": "127.0.0.1,images.internal",
        "CA_ANALYTICS_DIR": str(tmp_path / "analytics"),
        "CA_PREFERENCES_URI": str(tmp_path / "prefs.jsonl"),
        "CA_KEEP_FRACTION": "0.12",
        "CA_EVAL_URI": str(tmp_path / "eval.parquet"),
        "CA_EVAL_CLASSES_URI": str(tmp_path / "classes.parquet"),
        "CA_CLIP_DIR": str(tmp_path / "clip"),
        "CA_BLIP_DIR": str(tmp_path / "blip"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_env = resources_from_env()
    in_process = build_resources(  # what `ca-platform run` builds from the same settings given as flags
        env["CA_POOL_URI"],
        env["CA_DATA_URI"],
        ["127.0.0.1", "images.internal"],
        analytics_dir=env["CA_ANALYTICS_DIR"],
        preferences_uri=env["CA_PREFERENCES_URI"],
        baselines=BaselineConfig(clip_pretrained_dir=env["CA_CLIP_DIR"], blip_pretrained_dir=env["CA_BLIP_DIR"]),
        keep_fraction=0.12,
        evaluation_uri=env["CA_EVAL_URI"],
        classes_uri=env["CA_EVAL_CLASSES_URI"],
    )
    asked_for = {key for asset in ALL_ASSETS for key in asset.required_resource_keys} - {"io_manager"}  # Dagster's own
    assert asked_for <= set(from_env) and set(from_env) == set(in_process)
    locations = {"pool_uri", "data_uri"}  # for Dagster EnvVars, read when a run starts; paths in process
    for key in in_process:
        assert from_env[key].model_dump(exclude=locations) == in_process[key].model_dump(exclude=locations), key
    storage = from_env["storage"]
    assert isinstance(storage.pool_uri, EnvVar) and isinstance(storage.data_uri, EnvVar)
    assert (storage.pool_uri, storage.data_uri) == ("CA_POOL_URI", "CA_DATA_URI")
    assert from_env["downloader"].settings().policy.allow_hosts == {"127.0.0.1", "images.internal"}


def test_unset_settings_take_the_defaults_ca_platform_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    from ca_platform.cli import build_parser
    from ca_platform.resources import resources_from_env

    for name in OPTIONAL_ENV:
        monkeypatch.delenv(name, raising=False)
    resources = resources_from_env()
    demo = build_parser().parse_args(["demo"])
    assert resources["compression"].keep_fractions == [DEFAULT_KEEP_FRACTION]
    assert demo.keep == DEMO_KEEP_FRACTIONS and len(DEMO_KEEP_FRACTIONS) >= 2  # the demo draws a curve
    assert resources["downloader"].settings().policy.allow_hosts == frozenset()  # public addresses only
    assert resources["preferences"].uri is None and resources["evaluation"].uri is None
    assert resources["evaluation"].classes_uri is None  # no zero-shot classification unless asked

    monkeypatch.setenv("CA_KEEP_FRACTION", "a third")
    with pytest.raises(ValueError, match="CA_KEEP_FRACTION: keep fractions must be numbers .* 'a third'"):
        resources_from_env()


@pytest.mark.parametrize(
    ("text", "curve"),
    [
        ("0.3", [0.3]),  # one value keeps working: a curve of one point
        ("0.1,0.2,0.3,0.5", [0.1, 0.2, 0.3, 0.5]),
        (" 0.5, 0.1 ,0.3,0.1", [0.1, 0.3, 0.5]),  # ascending, each once
        ("1", [1.0]),
    ],
)
def test_keep_takes_one_fraction_or_the_curves_comma_list_from_the_cli_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, text: str, curve: list[float]
) -> None:
    from ca_platform.cli import build_parser
    from ca_platform.resources import resources_from_env

    args = build_parser().parse_args(["run", "--pool", "p", "--data", "d", "--keep", text])
    assert list(args.keep) == curve
    assert build_resources("p", "d", keep_fraction=args.keep)["compression"].curve() == tuple(curve)
    monkeypatch.setenv("CA_KEEP_FRACTION", text)
    assert resources_from_env()["compression"].keep_fractions == curve
    assert build_resources("p", "d", keep_fraction=curve[0])["compression"].keep_fractions == [curve[0]]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0.1,,0.3", "'' of '0.1,,0.3' is not a number"),
        ("0.1;0.3", "'0.1;0.3' of '0.1;0.3' is not a number"),
        ("0.3,0", "keep fraction 0.0 is outside \\(0, 1\\]"),
        ("1.5", "keep fraction 1.5 is outside"),
        ("nan", "keep fraction nan is outside"),
    ],
)
def test_a_bad_keep_list_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, reason: str
) -> None:
    from ca_platform.cli import build_parser
    from ca_platform.resources import resources_from_env

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--pool", "p", "--data", "d", "--keep", text])
    assert re.search(f"argument --keep: .*{reason}", capsys.readouterr().err)
    monkeypatch.setenv("CA_KEEP_FRACTION", text)
    with pytest.raises(ValueError, match=f"CA_KEEP_FRACTION: .*{reason}"):
        resources_from_env()


@pytest.mark.slow
def test_dagster_cli_materializes_one_partition_through_the_workspace(
    web_pool: Callable[..., Path], tmp_path: Path
) -> None:
    pool = web_pool(rows_per_shard=5)
    data = tmp_path / "data"
    env = cli_env(tmp_path, CA_POOL_URI=str(pool), CA_DATA_URI=str(data), CA_ALLOW_HOSTS="127.0.0.1")

    validated = subprocess.run(
        [BIN / "dagster", "definitions", "validate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert validated.returncode == 0, validated.stderr[-2000:]  # no target given: dagster reads workspace.yaml

    registered = subprocess.run(
        [BIN / "ca-platform", "shards", "register", "--pool", str(pool)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert "part-00000, part-00001" in registered.stdout

    module, working_dir = _workspace_module()
    materialized = subprocess.run(
        [
            BIN / "dagster",
            "asset",
            "materialize",
            "-m",
            module,
            "-d",
            working_dir,
            "--select",
            "raw_pool_shard,downloaded_shard",
            "--partition",
            "part-00001",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert materialized.returncode == 0, materialized.stderr[-3000:]
    assert pl.read_parquet(data / layout.download_rows_key("part-00001")).height == 5
    assert not (data / layout.download_rows_key("part-00000")).exists()


@pytest.mark.slow
def test_run_command_accounts_for_every_input_row_on_its_embedded_ray(
    web_pool: Callable[..., Path], tmp_path: Path
) -> None:
    """`ca-platform run` as a user runs it: no engine settings, so it starts its own local Ray and says so."""
    pool = web_pool(rows_per_shard=7)
    data = tmp_path / "data"
    env = {k: v for k, v in cli_env(tmp_path).items() if k not in ("CA_ENGINE", "CA_RAY_ADDRESS", "RAY_ADDRESS")}
    done = subprocess.run(
        [BIN / "ca-platform", "run", "--pool", str(pool), "--data", str(data), "--allow-host", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "engine: embedded local Ray at" in done.stdout
    assert "shards: 2, rows: 14, downloaded: 10" in done.stdout
    input_rows = sum(pl.read_parquet(p).height for p in pool.glob("*.parquet"))
    db = data / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT (shard, uid)) FROM downloads").rows == [
        (input_rows, input_rows)
    ]

    statuses = analytics.query(db, "SELECT DISTINCT status FROM downloads ORDER BY status").rows
    assert [status for (status,) in statuses] == ["failed_to_decode", "failed_to_download", "success"]


def test_a_bad_labelled_set_or_template_stops_the_run_before_anything_is_downloaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ca_platform.cli import main

    pool = tmp_path / "pool"
    pool.mkdir()
    pl.DataFrame({"url": ["http://x/1.png"], "caption": ["c"]}).write_parquet(pool / "part.parquet")
    classes = tmp_path / "classes.parquet"
    pl.DataFrame({"url": ["http://x/a.png", "http://x/b.png"], "label": ["cat", None]}).write_parquet(classes)
    command = ["run", "--pool", str(pool), "--data", str(tmp_path / "data"), "--engine", "inline"]
    command += ["--eval", str(tmp_path / "eval.parquet"), "--eval-classes", str(classes)]
    assert main(command) == 1
    assert f"error: {classes}: empty label at rows [2]" in capsys.readouterr().err
    pl.DataFrame({"url": ["http://x/a.png", "http://x/b.png"], "label": ["cat", "dog"]}).write_parquet(classes)
    assert main([*command, "--eval-template", "a photo"]) == 1
    assert "prompt templates ['a photo'] must each hold '{}'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing ran
    assert main(command[:-4] + ["--eval-classes", str(classes)]) == 2  # without --eval no model is trained
    assert "need --eval" in capsys.readouterr().err


@pytest.mark.slow
def test_run_command_fails_loudly_on_a_malformed_shard(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    pl.DataFrame({"link": ["http://x/1.png"], "caption": ["c"]}).write_parquet(pool / "broken.parquet")
    done = subprocess.run(
        [BIN / "ca-platform", "run", "--pool", str(pool), "--data", str(tmp_path / "data")],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "broken.parquet" in done.stdout and "'url'" in done.stdout


@pytest.mark.slow
def test_rerun_after_a_killed_download_leaves_no_duplicates(
    web_pool: Callable[..., Path], routes_server: RoutesServer, tmp_path: Path
) -> None:
    pool = web_pool(rows_per_shard=80, failures=False)
    data = tmp_path / "data"
    command = [BIN / "ca-platform", "run", "--pool", str(pool), "--data", str(data), "--allow-host", "127.0.0.1"]

    routes_server.delay_s = 0.5  # slow enough to be killed mid-download
    process = subprocess.Popen(
        command, env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list((data / ".staging").glob("downloads-*/out/*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list((data / ".staging").glob("downloads-*/out/*.tar")), "the run was not caught mid-download"
    assert not (data / layout.download_rows_key("part-00000")).exists()  # nothing a reader would take as done

    routes_server.delay_s = 0.0
    rerun = run_lineage(build_resources(str(pool), str(data), ["127.0.0.1"]))  # the command's settings, here
    assert rerun.success, report(rerun)
    db = data / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(160, 160)]
    # only the killed attempt's private folder is left, for the stale sweep: no run deletes another's staging
    assert len(list((data / ".staging").iterdir())) == 1
    for shard in ("part-00000", "part-00001"):
        ledger = pl.read_parquet(data / layout.download_rows_key(shard))
        on_disk = {p.name for p in (data / layout.download_prefix(shard)).glob("*.tar")}
        assert on_disk == set(ledger["tar"].drop_nulls())


def test_sql_command_answers_under_a_quoted_data_root_and_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ca_platform.cli import main

    data = tmp_path / "it's data"
    assert main(["sql", "--data", str(data), "SELECT count(*) AS n FROM downloads"]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == "0"

    for query, message in [
        ("CREATE TABLE t (a INTEGER)", "read-only"),
        ("SELEC 1", 'syntax error at or near "SELEC"'),
        ("SELECT * FROM nowhere", "nowhere does not exist"),
    ]:
        assert main(["sql", "--data", str(data), query]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and message in captured.err, captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_shards_list_names_ignored_files_and_colliding_keys_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ca_platform.cli import main

    pool = tmp_path / "pool"
    (pool / "a").mkdir(parents=True)
    pl.DataFrame({"url": ["u"], "caption": ["c"]}).write_parquet(pool / "a" / "x.parquet")
    (pool / "notes.txt").write_text("about the pool")
    assert main(["shards", "list", "--pool", str(pool)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"a__x\t{pool / 'a' / 'x.parquet'}\n"
    assert captured.err == f"ignored: {pool / 'notes.txt'}: not a .parquet file\n"

    pl.DataFrame({"url": ["u"], "caption": ["c"]}).write_parquet(pool / "a__x.parquet")
    assert main(["shards", "list", "--pool", str(pool)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "'a/x.parquet' and 'a__x.parquet' -> 'a__x'" in error

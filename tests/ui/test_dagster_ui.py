"""The Dagster UI in a real browser.

`dagster dev` (webserver and daemon, as `make ui` starts it) runs on a small shapes world whose images are served
on 127.0.0.1; headless Chromium, driven by Selenium through Debian's chromedriver (`make browser` installs both),
does what a user of the platform does there: finds every asset of the lineage in the global asset graph, opens
`downloaded_shard`'s partitions, launches a backfill of the new shards from the Materialize dialog and waits
for it, sees the shards' checks passed, and opens the latest cut's reward-score histogram. A screenshot of each
page is saved in $CA_UI_SCREENSHOTS (default: the test's own folder).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import yaml
from dagster import DagsterInstance
from selenium import webdriver
from selenium.common.exceptions import (
    JavascriptException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from ca_platform.assets import ALL_ASSETS
from ca_platform.assets.compression import score_threshold
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.jobs import shard_spine_job
from ca_platform.demo.image_server import ImageServer
from ca_platform.demo.shapes_pool import ShapesWorldConfig, ShapesWorldPool, generate_pool
from ca_platform.instance import write_instance_config
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.resources import BaselineConfig, ScoringConfig
from ca_platform.runner import build_resources, register_shards, run_lineage
from ca_platform.scoring.registry import register_reward_checkpoint
from ca_platform.scoring.reward.model import RewardModelSpec, build_reward_model
from ca_platform.scoring.reward.scorer import save_reward_model
from ca_platform.scoring.reward.train import TrainedRewardModel
from tests.conftest import BIN

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS_ENV = "CA_UI_SCREENSHOTS"
# One shard runs through the lineage (up to the cut and its histogram) before the UI starts; the others are new
# partitions, left missing for the backfill the browser launches.
WORLD = ShapesWorldConfig(seed=3, shards=3, rows_per_shard=16)
PREPARED_SHARDS = 1
WINDOW = (1600, 1000)
# Below this zoom the asset graph draws nodes without their full names (Dagster's MINIMAL_SCALE is 0.6).
READABLE_GRAPH_SCALE = 0.65
UI_TIMEOUT_S = 180.0  # dagster dev loading the code location, a page waiting for its data, on a busy machine
BACKFILL_TIMEOUT_S = 420.0  # two shards' runs: a process each, read, validate and download 16 rows
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# What a condition meets while React re-renders the page under it: polled again.
PAGE_CHANGING = (NoSuchElementException, StaleElementReferenceException, JavascriptException)
T = TypeVar("T")
log = logging.getLogger(__name__)


class Stopwatch:
    """Logs how long each step took (shown when the test fails, or with --log-cli-level=INFO)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        log.info("%s: %.1f s (%.1f s in all)", step, now - self.last, now - self.started)
        self.last = now


@dataclass
class DagsterUI:
    """A running `dagster dev` and what the test expects of it."""

    url: str
    location: str  # the code location workspace.yaml loads
    prepared_shards: list[str]  # materialized through the cut before the UI started
    new_shards: list[str]  # registered partitions, never materialized
    log: Path  # dagster dev's output: the daemon's and the runs' logs

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _asset_names() -> list[str]:
    """Every asset the platform defines, as the UI names them (the last part of the key)."""
    keys = [key for a in ALL_ASSETS for key in (a.keys if hasattr(a, "keys") else [a.key])]
    return sorted(key.path[-1] for key in keys)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reward_checkpoint(root: Path) -> Path:
    """A tiny reward model "trained elsewhere", pinned instead of trained from preferences (seconds, not a minute).
    Its output layer is drawn at random rather than zero-initialized, so that its scores spread and the
    histogram shows a distribution."""
    torch.manual_seed(0)
    tokenizer, spec = bert_tokenizer(), RewardModelSpec(image_size=32)
    model = build_reward_model(spec, tokenizer)
    for parameter in model.head[-1].parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    trained = TrainedRewardModel(model, tokenizer, spec, {"reward_mean": 0.0, "reward_std": 1.0})
    return save_reward_model(trained, root)[1]


def _prepare_lineage(
    world: ShapesWorldPool, data: Path, instance: DagsterInstance, scratch: Path
) -> tuple[list[str], list[str]]:
    """The first shard through the lineage up to the cut (`score_threshold` and its histogram) and the subsets, on
    the UI's instance; then the other shards are registered as partitions, never materialized. Returns the keys
    of both."""
    new_files = world.shard_paths[PREPARED_SHARDS:]
    aside = scratch / "new-shards"
    aside.mkdir()
    for path in new_files:
        path.rename(aside / path.name)
    resources = build_resources(
        str(world.pool_dir),
        str(data),
        ["127.0.0.1"],
        download_options={"thread_count": 4},
        baselines=BaselineConfig(epochs=1, batch_size=8, image_size=32),
        scoring=ScoringConfig(num_workers=0, batch_size=8),
    )
    storage = resources["storage"]
    register_reward_checkpoint(storage.data_store(), _reward_checkpoint(scratch / "reward"), scratch / "staging")
    try:
        prepared = [shard.key for shard in register_shards(storage.pool_store(), instance)]
        run = run_lineage(resources, instance, compress=True)
    finally:
        for path in new_files:
            (aside / path.name).rename(path)
    assert run.success, [r for r in run.runs if not r.success]
    new = [shard.key for shard in register_shards(storage.pool_store(), instance) if shard.key not in prepared]
    assert len(new) == WORLD.shards - PREPARED_SHARDS, new
    return prepared, new


def _write_instance(home: Path) -> None:
    """The instance `make ui` writes (`ca-platform instance init`: SQLite and its run queue), less the sign-up
    dialog Dagster shows once per new instance over whatever page is open."""
    path = write_instance_config(home, None)
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "nux": {"enabled": False}}, sort_keys=False))


def _ui_env(home: Path, pool: Path, data: Path) -> dict[str, str]:
    """dagster dev's environment as `make ui` sets it, and no other platform setting from this one."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CA_")}
    return {
        **env,
        "DAGSTER_HOME": str(home),
        "CA_POOL_URI": str(pool),
        "CA_DATA_URI": str(data),
        "CA_ALLOW_HOSTS": "127.0.0.1",
        "CA_ENGINE": "inline",
        "PYTHONUNBUFFERED": "1",
    }


def _stop_sensors(env: dict[str, str]) -> list[tuple[str, subprocess.Popen[str]]]:
    """Turn every sensor off on the instance before the daemon starts (its first tick comes at once), so that the
    only runs are those the browser launches: the shard sensor would request the new shards itself, and the
    automation sensor would rescore them after the backfill. Started side by side; `_finish_sensor_stops` waits."""
    from ca_platform.definitions import defs

    return [
        (
            sensor.name,
            subprocess.Popen(
                [str(BIN / "dagster"), "sensor", "stop", sensor.name, "-w", "workspace.yaml"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            ),
        )
        for sensor in defs.sensors or []
    ]


def _finish_sensor_stops(stops: list[tuple[str, subprocess.Popen[str]]]) -> None:
    for name, process in stops:
        try:
            output, _ = process.communicate(timeout=UI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _end_process_group(process)
            raise
        assert process.returncode == 0 and f"Stopped sensor {name}" in output, output[-3000:]


def _end_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL to the process's session: dagster dev with its webserver, daemon and code server, and the runs they
    started (none of them starts a session of its own). dagster dev's own shutdown waits up to a minute on its
    daemon, and nothing of this instance is kept."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)
    deadline = time.monotonic() + 30
    while left := _live_members(process.pid):
        assert time.monotonic() < deadline, f"processes {left} of session {process.pid} outlived SIGKILL"
        time.sleep(0.2)


def _live_members(group: int) -> list[int]:
    """The processes of a process group, less the zombies a killed process leaves until someone reaps it."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(pgrp) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _wait_for_webserver(url: str, process: subprocess.Popen[bytes], ui: DagsterUI) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + UI_TIMEOUT_S
    while True:
        assert process.poll() is None, f"dagster dev exited with {process.returncode}:\n{ui.log_tail()}"
        try:
            with opener.open(f"{url}/server_info", timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline, f"dagster dev did not answer on {url}:\n{ui.log_tail()}"
            time.sleep(1)


@pytest.fixture
def dagster_ui(tmp_path: Path) -> Iterator[DagsterUI]:
    """`dagster dev` on a shapes world of three shards served on 127.0.0.1: one shard materialized through the
    cut beforehand on the same instance, two new ones registered, every sensor off."""
    clock = Stopwatch()
    home, data, world_dir = tmp_path / "dagster_home", tmp_path / "data", tmp_path / "world"
    _write_instance(home)
    world_dir.mkdir()
    with ImageServer(world_dir) as images:
        world = generate_pool(world_dir, images.base_url, WORLD)
        env = _ui_env(home, world.pool_dir, data)
        with DagsterInstance.from_config(str(home)) as instance:  # creates its databases before anyone else opens it
            stops = _stop_sensors(env)
            try:
                prepared, new = _prepare_lineage(world, data, instance, tmp_path)
                clock.lap("shard through the lineage")
            finally:
                _finish_sensor_stops(stops)
        clock.lap("sensors off")
        location = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
        url = f"http://127.0.0.1:{_free_port()}"
        ui = DagsterUI(url, location["module_name"], prepared, new, tmp_path / "dagster-dev.log")
        with ui.log.open("wb") as log:
            process = subprocess.Popen(
                [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_webserver(url, process, ui)
            clock.lap("dagster dev answering")
            yield ui
        finally:
            _end_process_group(process)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Debian Chromium with a fresh profile, driven through Debian's chromedriver."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: `make browser` installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path / "chromium-profile"
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    )
    try:
        yield driver
    finally:
        driver.quit()


class UiSession:
    """The browser on the UI: pages by path, waits that fail saying what the page showed, a screenshot per page."""

    def __init__(self, driver: WebDriver, ui: DagsterUI, screenshots: Path) -> None:
        self.driver, self.ui, self.screenshots = driver, ui, screenshots

    def open(self, path: str) -> None:
        self.driver.get(self.ui.url + path)

    def text(self) -> str:
        try:
            return self.driver.find_element(By.TAG_NAME, "body").text
        except WebDriverException:
            return ""

    def wait(
        self, condition: Callable[[WebDriver], T], what: str | Callable[[], str], timeout: float = UI_TIMEOUT_S
    ) -> T:
        """`condition`'s first truthy value, polled; else a failure naming `what`, the URL and the page's text."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.5, ignored_exceptions=PAGE_CHANGING).until(
                condition
            )
        except TimeoutException:
            self.shot("failure")
            described = what() if callable(what) else what
            raise AssertionError(
                f"{described}: not seen within {timeout:.0f} s at {self.driver.current_url}; the page says:\n"
                f"{self.text()[:3000]}"
            ) from None

    def element(self, xpath: str, what: str, within: WebElement | None = None) -> WebElement:
        """The first displayed element at `xpath` (relative to `within` when given)."""
        root = within or self.driver

        def shown(_: WebDriver) -> WebElement | None:
            return next((e for e in root.find_elements(By.XPATH, xpath) if e.is_displayed()), None)

        return self.wait(shown, what)

    def shot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


GRAPH_STATE_JS = """
const svg = [...document.querySelectorAll('svg')].find(s => s.parentElement && s.parentElement.style.transform);
if (!svg) return null;
const view = svg.parentElement.parentElement.getBoundingClientRect();
return {width: svg.width.baseVal.value, height: svg.height.baseVal.value, view_width: view.width,
        view_height: view.height, collapsed: svg.querySelectorAll("[aria-label='unfold_more']").length,
        expanded: svg.querySelectorAll("[aria-label='unfold_less']").length};
"""


def _see_every_asset_in_the_graph(session: UiSession, expected: list[str]) -> None:
    """The global lineage with every group expanded, drawn at a zoom that shows each asset's full name."""
    driver = session.driver
    session.open("/asset-groups")
    session.element("//button[.//*[@aria-label='settings'] and not(normalize-space())]", "the graph's settings").click()
    session.element("//*[text()='Expand all groups']", "'Expand all groups' in the graph's settings").click()

    def expanded(d: WebDriver) -> dict[str, float] | None:
        state = d.execute_script(GRAPH_STATE_JS)
        return state if state and state["expanded"] and not state["collapsed"] else None

    graph = session.wait(expanded, "every group of the asset graph expanded")
    # A window large enough for the whole graph at a readable zoom; the graph fits itself to it when loaded.
    grow_width = max(0.0, graph["width"] * READABLE_GRAPH_SCALE - graph["view_width"])
    grow_height = max(0.0, graph["height"] * READABLE_GRAPH_SCALE - graph["view_height"])
    if grow_width or grow_height:
        size = driver.get_window_size()
        driver.set_window_size(size["width"] + int(grow_width) + 1, size["height"] + int(grow_height) + 1)
        driver.refresh()
    seen: set[str] = set()

    def every_asset_named(d: WebDriver) -> bool:
        seen.update(e.get_attribute("data-tooltip") for e in d.find_elements(By.CSS_SELECTOR, "svg [data-tooltip]"))
        return set(expected) <= seen

    session.wait(
        every_asset_named,
        lambda: f"every asset of the lineage in the graph (missing: {sorted(set(expected) - seen)})",
    )
    session.shot("01-asset-graph")
    driver.set_window_size(*WINDOW)


PARTITION_COUNTS = re.compile(r"(Failed|Materialized|Materializing|Missing) \((\d+)\)")


def _partition_counts(
    session: UiSession, asset: str, shards: list[str], timeout: float = UI_TIMEOUT_S, **expected: int
) -> None:
    """`asset`'s Partitions tab lists every shard and counts them as `expected` (materialized=, missing=);
    reloaded every few seconds until it does. A failed partition fails at once, with dagster dev's log."""
    session.open(f"/assets/{asset}?view=partitions")
    for shard in shards:
        session.element(f"//*[text()='{shard}']", f"partition {shard} of {asset}")
    wanted = {state.capitalize(): count for state, count in expected.items()}
    seen: dict[str, int] = {}
    loaded = time.monotonic()

    def counted(d: WebDriver) -> bool:
        nonlocal loaded
        seen.clear()
        seen.update({state: int(count) for state, count in PARTITION_COUNTS.findall(session.text())})
        if seen.get("Failed"):
            session.shot("failure")
            raise AssertionError(f"{asset}: {seen}\n{session.text()[:3000]}\n{session.ui.log_tail()}")
        if all(seen.get(state) == count for state, count in wanted.items()):
            return True
        if seen and time.monotonic() - loaded > 5:
            d.refresh()
            loaded = time.monotonic()
        return False

    session.wait(counted, lambda: f"{asset}'s partitions counted {wanted} (last seen: {seen})", timeout)


def _launch_backfill(session: UiSession, job: str, new_shards: list[str], all_shards: list[str]) -> str:
    """From the page of the job that reads and downloads a shard: Materialize all -> the missing partitions ->
    Launch backfill (a run of the job per shard). Returns the backfill's id."""
    session.open(f"/locations/{session.ui.location}/jobs/{job}")
    materialize_all = "//button[starts-with(normalize-space(), 'Materialize all')]"
    session.element(materialize_all, f"Materialize all of job {job}").click()
    dialog = session.element(
        "//div[contains(@class, 'bp5-dialog')][.//*[starts-with(normalize-space(), 'Launch runs to materialize')]]",
        "the Materialize dialog",
    )
    session.element(".//button[normalize-space()='Missing']", "the dialog's Missing partitions", dialog).click()
    selected: list[str] = []

    def new_shards_selected(_: WebDriver) -> bool:
        tags = {e.get_attribute("data-tooltip") for e in dialog.find_elements(By.CSS_SELECTOR, "[data-tooltip]")}
        selected[:] = sorted(tags & set(all_shards))
        return selected == sorted(new_shards)

    session.wait(new_shards_selected, lambda: f"the new shards {new_shards} selected in the dialog (it has {selected})")
    session.shot("03-backfill-dialog")
    session.element(".//button[normalize-space()='Launch backfill']", "Launch backfill", dialog).click()
    created = session.element("//*[starts-with(normalize-space(text()), 'Created backfill')]", "the new backfill")
    backfill = re.fullmatch(r"Created backfill (\S+)", created.text.strip())
    assert backfill, created.text
    return backfill.group(1)


def _check_statuses(session: UiSession, checks: list[str]) -> dict[str, str]:
    """Each check's status as the asset's Checks tab lists it (the name, then the latest execution's status)."""
    statuses: dict[str, str] = {}

    def every_check_listed(d: WebDriver) -> bool:
        for check in checks:
            items = d.find_elements(By.XPATH, f"//*[text()='{check}']/ancestor::span[1]")
            lines = items[0].text.splitlines() if items else []
            statuses[check] = lines[1] if len(lines) > 1 else ""
        return all(statuses.values())

    session.wait(every_check_listed, lambda: f"every check {checks} listed with a status (seen: {statuses})")
    return statuses


def _histogram_width(session: UiSession, asset: str) -> int:
    """Open the latest materialization of `asset`, show its `histogram` markdown; the rendered image's width."""
    session.open(f"/assets/{asset}?view=events")
    session.element(
        "//*[normalize-space(text())='histogram']/ancestor::tr[1]//*[text()='[Show Markdown]']",
        f"the histogram of {asset}'s latest materialization",
    ).click()
    image = session.element("//div[contains(@class, 'bp5-dialog')]//img", "the histogram's image in its dialog")
    return session.wait(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
        "the histogram image loaded",
    )


@pytest.mark.slow
def test_the_ui_shows_the_lineage_backfills_shards_and_shows_their_checks_and_the_histogram(
    dagster_ui: DagsterUI, browser: WebDriver, tmp_path: Path
) -> None:
    screenshots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    screenshots.mkdir(parents=True, exist_ok=True)
    session = UiSession(browser, dagster_ui, screenshots)
    prepared, new = dagster_ui.prepared_shards, dagster_ui.new_shards
    shards = sorted(prepared + new)
    shard_asset = downloaded_shard.key.to_user_string()
    clock = Stopwatch()

    _see_every_asset_in_the_graph(session, _asset_names())
    clock.lap("asset graph")

    _partition_counts(session, shard_asset, shards, materialized=len(prepared), missing=len(new))
    session.shot("02-downloaded-shard-partitions")
    clock.lap("partitions")

    backfill = _launch_backfill(session, shard_spine_job.name, new, shards)
    clock.lap("backfill launched")
    _partition_counts(session, shard_asset, shards, BACKFILL_TIMEOUT_S, materialized=len(shards), missing=0)
    session.shot("04-downloaded-shard-partitions-after-backfill")
    clock.lap("backfill materialized")
    session.open(f"/runs/b/{backfill}")
    session.element(f"//*[text()='{len(new)} partitions']", f"backfill {backfill} of {len(new)} partitions")
    session.shot("05-backfill")

    session.open(f"/assets/{shard_asset}?view=checks")
    statuses = _check_statuses(session, [spec.name for spec in downloaded_shard.check_specs])
    session.shot("06-downloaded-shard-checks")
    assert set(statuses.values()) == {"Succeeded"}, statuses
    clock.lap("checks")

    assert _histogram_width(session, score_threshold.key.to_user_string()) > 0
    session.shot("07-score-threshold-histogram")
    clock.lap("histogram")

"""Progress lines of long steps: what they say, where they go, and the throughput metadata of materializations."""

from __future__ import annotations

import logging
import re

import pytest

from ca_platform import progress
from ca_platform.progress import ProgressBoard, Task, rate_metadata, throughput_line, track


@pytest.fixture
def progress_lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=progress.LOGGER_NAME)
    return caplog


def test_a_task_says_it_started_how_far_it_is_with_rate_time_left_and_values_and_how_it_ended(
    progress_lines: pytest.LogCaptureFixture,
) -> None:
    with Task("clip full seed 0: training", total=100, unit="sample", interval_s=0.0) as task:
        task.advance(40, loss=0.51234)
    lines = [record.getMessage() for record in progress_lines.records]
    assert lines[0] == "clip full seed 0: training: started, 100 samples"
    assert re.fullmatch(
        r"clip full seed 0: training: 40/100 samples \([\d.]+/s, about [\d.]+ s left\), loss 0\.5123, [\d.]+ s",
        lines[1],
    ), lines[1]
    assert re.fullmatch(r"clip full seed 0: training: 40 samples in [\d.]+ s \([\d.]+/s\), loss 0\.5123", lines[2])


def test_a_failing_task_says_so_and_track_counts_items(progress_lines: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError), Task("scoring", unit="pair"):
        raise ValueError("bad image")
    assert progress_lines.records[-1].getMessage().startswith("scoring: failed after ")
    assert list(track(range(3), "images", total=3, unit="image")) == [0, 1, 2]
    assert re.fullmatch(r"images: 3 images in [\d.]+ s \([\d.]+/s\)", progress_lines.records[-1].getMessage())


def test_lines_reach_the_terminal_unless_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress.LOGGER, "handlers", [])
    monkeypatch.setenv(progress.MODE_ENV, "lines")  # restored after the test, whatever show_in_terminal sets
    assert progress.show_in_terminal() == "lines"  # not a terminal here
    progress.say("spine: 2 runs")
    assert capsys.readouterr().out == "spine: 2 runs\n"
    monkeypatch.setattr(progress.LOGGER, "handlers", [])
    progress.show_in_terminal("quiet")
    progress.say("spine: 2 runs")
    assert capsys.readouterr().out == ""


def test_throughput_metadata_reads_back_as_a_line() -> None:
    metadata = rate_metadata(200, "rows", 2.0)
    assert metadata == {"rows": 200, "seconds": 2.0, "rows_per_second": 100.0}
    assert throughput_line("downloaded_shard", metadata) == "downloaded_shard: 200 rows in 2.0 s (100.0/s)"
    assert throughput_line("score_threshold", {"pairs": 10}) is None


def test_the_board_keeps_each_workers_latest_line_and_a_read_clears_nothing() -> None:
    board = ProgressBoard()
    board.post("pid 1", "a: started")
    board.post("pid 1", "a: 10/20 rows")
    board.post("pid 2", "b: started")
    assert board.since(0) == (3, ["a: 10/20 rows", "b: started"])
    assert board.since(2) == (3, ["b: started"])
    assert board.since(3) == (3, [])

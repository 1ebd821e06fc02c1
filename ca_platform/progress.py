"""Progress of long steps, for the terminal and the Dagster UI alike.

Long loops (downloads, scoring, captioning, training steps, evaluation) wrap their work in a `Task`, which says
how far it is through the `ca_platform.progress` logger: a line at the start, one every few seconds with the
rate, the time left and values such as the current loss, and one at the end. Lines are log records, so they
reach whoever listens: Dagster captures them into the run's logs (the instance lists this logger among its
managed Python loggers, see ca_platform.instance), `ca-platform run` and `demo` print them (`show_in_terminal`),
and a Ray worker posts them to the driver's `ProgressBoard`, which the driver prints while it waits. On a
terminal the driver also draws a live bar (tqdm) per task in its own process; the plain lines then stay out of
the terminal, and still go to the logs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

LOGGER_NAME = "ca_platform.progress"
LOGGER = logging.getLogger(LOGGER_NAME)
LOGGER.setLevel(logging.INFO)
MODE_ENV = "CA_PROGRESS"  # how a process shows progress: "bar", "lines" or "quiet" (inherited by workers)
BOARD_ENV = "CA_PROGRESS_BOARD"  # the name of the driver's ProgressBoard actor, for Ray workers
LINE_INTERVAL_S = 10.0  # how often a running task says how far it is
Mode = Literal["bar", "lines", "quiet"]
T = TypeVar("T")


def _mode() -> Mode:
    mode = os.environ.get(MODE_ENV, "lines")
    return mode if mode in ("bar", "lines", "quiet") else "lines"  # type: ignore[return-value]


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class Task:
    """How far one long step is: `advance` it as work gets done, with values worth showing (e.g. loss=0.42).

    A context manager: the closing line says how long it took and its rate, or that it failed.
    """

    def __init__(
        self, description: str, total: int | None = None, unit: str = "item", interval_s: float = LINE_INTERVAL_S
    ) -> None:
        self.description, self.total, self.unit, self.interval_s = description, total, unit, interval_s
        self.done = 0
        self.values: dict[str, Any] = {}
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar = None
        if _mode() == "bar" and os.environ.get(BOARD_ENV) is None and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True)
        self._say(f"{description}: started" + (f", {total} {unit}s" if total is not None else ""))

    def advance(self, count: int = 1, **values: Any) -> None:
        self.done += count
        self.values.update(values)
        if self._bar is not None:
            self._bar.update(count)
            if values:
                self._bar.set_postfix({k: _shown(v) for k, v in self.values.items()}, refresh=False)
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._say(self.line())

    def line(self) -> str:
        """`description: done/total unit (rate/s, about T left), values, elapsed`."""
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total is not None and rate > 0 and self.done < self.total:
            left = f", about {_seconds((self.total - self.done) / rate)} left"
        values = "".join(f", {name} {_shown(value)}" for name, value in self.values.items())
        return f"{self.description}: {self.done}{of} {self.unit}s ({rate:.1f}/s{left}){values}, {_seconds(elapsed)}"

    def close(self, failed: BaseException | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self.started
        if failed is not None:
            self._say(f"{self.description}: failed after {_seconds(elapsed)} ({type(failed).__name__})")
            return
        rate = self.done / elapsed if elapsed > 0 else 0.0
        values = "".join(f", {name} {_shown(value)}" for name, value in self.values.items())
        self._say(f"{self.description}: {self.done} {self.unit}s in {_seconds(elapsed)} ({rate:.1f}/s){values}")

    def _say(self, line: str) -> None:
        LOGGER.info(line, extra={"ca_progress_bar": self._bar is not None})

    def __enter__(self) -> Task:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        self.close(error)


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "item") -> Iterator[T]:
    """`items`, one by one, with a Task advancing by one per item."""
    with Task(description, total, unit) as task:
        for item in items:
            yield item
            task.advance()


class _TerminalLines(logging.Handler):
    """Prints progress lines on stdout; a line whose task draws a bar is left to the bar, and while bars are
    drawn lines go through tqdm so that they do not tear a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "ca_progress_bar", False):
            return
        line = self.format(record)
        if _mode() == "bar":
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)


def show_in_terminal(mode: Mode | None = None) -> Mode:
    """Print progress lines in this process (once): `mode` or, by default, a bar on a terminal, plain lines
    otherwise (CI, logs); "quiet" prints none. Worker processes inherit the mode through the environment."""
    chosen: Mode = mode or ("bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines")
    os.environ[MODE_ENV] = chosen
    if chosen != "quiet" and not any(isinstance(h, _TerminalLines) for h in LOGGER.handlers):
        handler = _TerminalLines()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    return chosen


def rate_metadata(count: int, unit: str, seconds: float) -> dict[str, float]:
    """What a materialization did and how fast, as its metadata: `unit` (a plural: "rows", "pairs") = count,
    `seconds`, and `<unit>_per_second`; shown in the UI and summed up by `throughput_line`."""
    return {unit: count, "seconds": round(seconds, 3), f"{unit}_per_second": round(count / max(seconds, 1e-9), 1)}


def throughput_line(asset: str, metadata: Mapping[str, Any]) -> str | None:
    """`asset: 200 rows in 1.2 s (166.7/s)` from metadata written with `rate_metadata`, else None."""
    values = {key: getattr(value, "value", value) for key, value in metadata.items()}
    for key, rate in values.items():
        unit = key.removesuffix("_per_second")
        if unit != key and unit in values and "seconds" in values:
            return f"{asset}: {values[unit]} {unit} in {values['seconds']:.1f} s ({rate:.1f}/s)"
    return None


def say(line: str) -> None:
    """A line of the run itself (a stage started or ended), shown like task lines."""
    LOGGER.info(line)


class ProgressBoard:
    """A Ray actor holding the latest progress line of each worker, numbered, for the driver to show while it
    waits. Reading does not clear it: a read that timed out in the driver loses nothing."""

    def __init__(self) -> None:
        self.posted = 0
        self.lines: dict[str, tuple[int, str]] = {}

    def post(self, worker: str, line: str) -> None:
        self.posted += 1
        self.lines[worker] = (self.posted, line)

    def since(self, seen: int) -> tuple[int, list[str]]:
        """How many lines were posted so far, and the latest line of each worker posted after the `seen`-th."""
        return self.posted, [line for number, line in self.lines.values() if number > seen]


class _BoardPoster(logging.Handler):
    """In a Ray worker: sends each progress line to the driver's board (fire and forget)."""

    def __init__(self, board: Any, worker: str) -> None:
        super().__init__()
        self.board, self.worker = board, worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.board.post.remote(self.worker, record.getMessage())
        except Exception:  # noqa: BLE001 - progress must never break the work it reports on
            pass


def post_to_board() -> None:
    """In a Ray worker started by a driver with a board: send progress lines there (once per process)."""
    name = os.environ.get(BOARD_ENV)
    if not name or any(isinstance(h, _BoardPoster) for h in LOGGER.handlers):
        return
    import ray

    try:
        board = ray.get_actor(name)
    except ValueError:
        return
    LOGGER.addHandler(_BoardPoster(board, f"pid {os.getpid()}"))

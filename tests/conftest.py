"""Shared test fixtures: real HTTP servers on 127.0.0.1, real files, small pools."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from ca_platform import layout, schemas

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Shards run inline, one after another in the test's process (and in the CLI processes tests start), unless a
# test is about the Ray engine and says so: starting a local Ray costs seconds per process.
os.environ["CA_ENGINE"] = "inline"
BIN = Path(sys.executable).parent  # the virtualenv's commands: ca-platform, dagster, dagster-daemon


def cli_env(folder: Path, **extra: str) -> dict[str, str]:
    """The environment of a command a test starts: this one, with a Dagster home of its own under `folder`."""
    home = folder / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").touch()
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


@dataclass(frozen=True)
class TimedRun:
    """A finished command, with when (seconds after it started) each line of its standard output arrived."""

    done: subprocess.CompletedProcess[str]
    lines: list[tuple[float, str]]


def run_timed(command: list[str], env: dict[str, str], stderr_file: Path, timeout_s: float = 600) -> TimedRun:
    """Run `command`, reading its standard output line by line as it comes (standard error goes to a file)."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with stderr_file.open("w") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append((time.monotonic() - started, line.rstrip("\n")))
            process.wait()
        finally:
            timer.cancel()
    stdout = "".join(f"{line}\n" for _, line in lines)
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr_file.read_text())
    return TimedRun(done, lines)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    """A small file that declares side x side pixels: a decompression bomb in miniature."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class RoutesServer:
    """An HTTP server on 127.0.0.1 answering fixed routes: status, headers and body per path.

    Unlike a file server it can redirect, send opt-out headers or lie about Content-Length, which is
    what the download guard has to cope with on the web.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.delay_s = 0.0
        routes, hits, server = self.routes, self.hits, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hits[self.path] = hits.get(self.path, 0) + 1
                time.sleep(server.delay_s)
                route = routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    if value:  # an empty value leaves the header out (body then ends at connection close)
                        self.send_header(name, value)
                if "Content-Length" not in route.headers:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, body: bytes = b"", status: int = 200, **headers: str) -> str:
        self.routes[path] = Route(status, body, {k.replace("_", "-"): v for k, v in headers.items()})
        return self.url(path)


@pytest.fixture
def routes_server() -> Iterator[RoutesServer]:
    server = RoutesServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def write_pool(pool_dir: Path, shards: dict[str, dict[str, list]]) -> Path:
    """Write parquet shards {name: {column: values}} into `pool_dir`."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    for name, columns in shards.items():
        pl.DataFrame(columns).write_parquet(pool_dir / f"{name}.parquet")
    return pool_dir


def build_web_pool(pool_dir: Path, server: RoutesServer, rows_per_shard: int = 10, failures: bool = True) -> Path:
    """A two-shard pool on `server`: mostly good images, a 404 and a corrupt body per shard (with `failures`)."""
    shards = {}
    for shard in range(2):
        urls, captions = [], []
        for row in range(rows_per_shard):
            path = f"/img/{shard}-{row}.png"
            server.add(path, png_bytes(24 + row, 20 + shard, seed=shard * 100 + row), Content_Type="image/png")
            urls.append(server.url(path))
            captions.append(f"a picture {shard}-{row}")
        if failures:
            urls[0] = server.url(f"/missing-{shard}.png")
            urls[1] = server.add(f"/corrupt-{shard}.png", b"<html>oops</html>", Content_Type="image/png")
        shards[f"part-{shard:05d}"] = {"url": urls, "caption": captions}
    return write_pool(pool_dir, shards)


@pytest.fixture
def web_pool(tmp_path: Path, routes_server: RoutesServer) -> Callable[..., Path]:
    """`build_web_pool` under this test's folder and server."""

    def build(rows_per_shard: int = 10, failures: bool = True) -> Path:
        return build_web_pool(tmp_path / "pool", routes_server, rows_per_shard, failures)

    return build


def write_evaluation_file(server: RoutesServer, path: Path, images: int, seed: int) -> tuple[Path, list[str]]:
    """An evaluation parquet (url, caption) of `images` PNGs served by `server`, one caption each; returns the
    file and the image URLs (to add further references)."""
    urls = [
        server.add(f"/eval/{seed}-{i}.png", png_bytes(30, 30, seed=seed + i), Content_Type="image/png")
        for i in range(images)
    ]
    pl.DataFrame({"url": urls, "caption": [f"picture {i}" for i in range(images)]}).write_parquet(path)
    return path, urls


def write_download_tar(path: Path, samples: list[tuple[str, str, str]]) -> Path:
    """A tar laid out as img2dataset writes it: `<key>.jpg`, `.txt` and `.json` (with the uid) per (key, uid,
    caption); each image's bytes differ."""
    with wds.TarWriter(str(path)) as writer:
        for key, uid, caption in samples:
            writer.write(
                {
                    "__key__": key,
                    "jpg": png_bytes(4, 4, seed=int(key)),
                    "txt": caption.encode(),
                    "json": json.dumps({"uid": uid, "key": key}).encode(),
                }
            )
    return path


# A downloaded pool of two shards written by hand (no server): what the training set and baselines read.
SHARDS = {"s0": [f"a{i}" for i in range(6)], "s1": [f"b{i}" for i in range(4)]}
KEYS = {uid: f"{index:09d}" for index, uid in enumerate(SHARDS["s0"] + SHARDS["s1"])}  # each sample's image differs


def _write_downloaded_shard(
    data: Path, shard: str, uids: list[str], split: int, token: str, captions: dict[str, str]
) -> None:
    """The shard's samples in two tars split after `split` samples, named with the run `token`, and its ledger."""
    rows = [(KEYS[uid], uid, captions.get(uid, f"a photo of {uid}")) for uid in uids]
    folder = data / layout.download_prefix(shard)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tar"):
        stale.unlink()
    names = [f"{token}-00000.tar", f"{token}-00001.tar"]
    write_download_tar(folder / names[0], rows[:split])
    write_download_tar(folder / names[1], rows[split:])
    ledger = pl.DataFrame(
        {
            schemas.UID: uids,
            schemas.SHARD: [shard] * len(uids),
            schemas.ROW_INDEX: list(range(len(uids))),
            schemas.STATUS: [schemas.Status.SUCCESS] * len(uids),
            "tar": [names[0] if i < split else names[1] for i in range(len(uids))],
        }
    )
    missing = {c: pl.lit(None) for c in schemas.DOWNLOAD_ROWS if c not in ledger.columns}
    schemas.conform(ledger.with_columns(**missing), schemas.DOWNLOAD_ROWS).write_parquet(
        data / layout.download_rows_key(shard)
    )


def write_downloaded_pool(data: Path, token: str = "run1", reverse: bool = False, captions: dict | None = None) -> None:
    """SHARDS as downloaded under the data root `data`; `reverse` writes each shard's samples in the opposite
    order and split, as another download run completing in another order would."""
    for shard, uids in SHARDS.items():
        ordered = list(reversed(uids)) if reverse else uids
        _write_downloaded_shard(data, shard, ordered, 2 if reverse else 3, token, captions or {})


def fast_reward_stage(folder: Path) -> dict[str, object]:
    """`build_resources` arguments for a reward stage that trains in seconds on a tiny pool: 24 simulated
    preference images written under `folder`, few epochs, small batches, scoring in the test's process."""
    from ca_platform.demo.annotators import ShapesPreferenceConfig, write_shapes_preferences
    from ca_platform.resources import BaselineConfig, RewardModelConfig, ScoringConfig

    return {
        "preferences_uri": str(write_shapes_preferences(folder, ShapesPreferenceConfig(images=24))),
        "reward_training": RewardModelConfig(epochs=8, learning_rate=1e-3, images_per_batch=8),
        "baselines": BaselineConfig(epochs=1, batch_size=8),
        "scoring": ScoringConfig(num_workers=0, batch_size=16),
    }


# A server that drips bytes: the slow host a per-read timeout never catches, which the guard's deadline must.
DRIP_EVERY_S = 2.0
ELAPSED = re.compile(r"deadline exceeded: (\d+\.\d) s total for this URL \((\d+\.\d) s elapsed\)")


class DripServer:
    """An HTTP server on 127.0.0.1 that sends a real PNG one byte every `DRIP_EVERY_S` seconds.

    `/body` sends the headers at once and drips the body; `/headers` drips from the status line on. Each read
    returns well within any per-read timeout, so only a total deadline stops the row. The server gives up
    after `give_up_s` so that a guard without a deadline fails its test in bounded time rather than hanging.
    """

    def __init__(self, body: bytes, give_up_s: float = 12.0) -> None:
        head = f"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request_line = self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                drip_headers = b" /headers " in request_line
                if not drip_headers:
                    self.wfile.write(head)
                    self.wfile.flush()
                started = time.monotonic()
                try:
                    for byte in head + body if drip_headers else body:
                        if time.monotonic() - started > give_up_s:
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(DRIP_EVERY_S)
                except OSError:  # the client hung up: what the deadline is for
                    return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def drip_server() -> Iterator[DripServer]:
    server = DripServer(png_bytes(24, 24, seed=5))
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def elapsed_in(error: str, deadline_s: float) -> float:
    """The elapsed seconds a deadline error names, after checking it names the deadline too."""
    match = ELAPSED.search(error)
    assert match, error
    assert float(match.group(1)) == deadline_s
    return float(match.group(2))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on loopback, with test credentials in the environment."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    from moto.server import ThreadedMotoServer  # heavy: imported only by the tests that need it

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()

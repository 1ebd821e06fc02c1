"""img2dataset behind the download guard, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import io
import socket
import tarfile
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from ca_platform import schemas
from ca_platform.ingest.download import DownloadSettings, download_shard
from ca_platform.ingest.download_guard import GuardError, GuardPolicy, guarded_urlopen
from ca_platform.ingest.webdataset_io import iter_samples
from ca_platform.schemas import Status
from tests.conftest import DripServer, RoutesServer, bomb_png, elapsed_in, png_bytes

LOOPBACK_ALLOWED = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=200_000, max_pixels=4_000_000)


def raw_frame(urls: list[str | None], captions: list[str] | None = None) -> pl.DataFrame:
    captions = captions or [f"caption {i}" for i in range(len(urls))]
    frame = pl.DataFrame(
        {
            "uid": [f"u{i}" for i in range(len(urls))],
            "shard": ["s"] * len(urls),
            "row_index": list(range(len(urls))),
            "url": urls,
            "caption": captions,
        },
        schema_overrides={"url": pl.String},
    )
    frame = frame.with_columns(
        pl.when(pl.col("url").is_null())
        .then(pl.lit("missing url"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("skip_reason")
    )
    return schemas.conform(frame, schemas.RAW_SHARD)


def run(raw: pl.DataFrame, tmp_path: Path, policy: GuardPolicy = LOOPBACK_ALLOWED, **settings) -> pl.DataFrame:
    result = download_shard(raw, tmp_path / "out", DownloadSettings(policy=policy, thread_count=4, **settings))
    return result.rows


def test_every_row_gets_one_status_with_a_reason(routes_server: RoutesServer, tmp_path: Path) -> None:
    urls = [
        routes_server.add("/ok.png", png_bytes(40, 30), Content_Type="image/png"),
        routes_server.url("/missing.png"),
        routes_server.add("/corrupt.jpg", b"\xff\xd8\xff garbage that is not a jpeg", Content_Type="image/jpeg"),
        routes_server.add("/huge.png", png_bytes(400, 400, seed=3), Content_Type="image/png"),
        routes_server.add("/bomb.png", bomb_png(6000), Content_Type="image/png"),
        routes_server.url("/ok.png").replace("127.0.0.1", "127.0.0.2"),
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "data:image/png;base64,iVBORw0KGgo=",
        routes_server.add("/optout.png", png_bytes(30, 30), Content_Type="image/png", X_Robots_Tag="noai"),
        None,
    ]
    ledger = run(raw_frame(urls), tmp_path)
    assert ledger.columns == list(schemas.DOWNLOAD_ROWS)
    assert ledger["uid"].to_list() == [f"u{i}" for i in range(len(urls))]
    statuses = dict(zip(ledger["uid"], ledger["status"]))
    assert statuses == {
        "u0": Status.SUCCESS,
        "u1": Status.FAILED_TO_DOWNLOAD,
        "u2": Status.FAILED_TO_DECODE,
        "u3": Status.TOO_LARGE,
        "u4": Status.TOO_LARGE,
        "u5": Status.REFUSED,
        "u6": Status.REFUSED,
        "u7": Status.REFUSED,
        "u8": Status.REFUSED,
        "u9": Status.OPTED_OUT,
        "u10": Status.SKIPPED,
    }
    errors = dict(zip(ledger["uid"], ledger["error"]))
    assert errors["u0"] is None
    assert "404" in errors["u1"]
    assert "loopback address 127.0.0.2" in errors["u5"]
    assert "pixels exceeds cap" in errors["u4"]
    assert "bytes" in errors["u3"]
    assert all(errors[u] for u in statuses if u != "u0")
    assert routes_server.hits.get("/ok.png") == 1  # the refused 127.0.0.2 copy never reached any server


def test_success_rows_point_into_a_readable_tar(routes_server: RoutesServer, tmp_path: Path) -> None:
    urls = [routes_server.add(f"/{i}.png", png_bytes(20 + i, 16, seed=i), Content_Type="image/png") for i in range(5)]
    result = download_shard(
        raw_frame(urls), tmp_path / "out", DownloadSettings(policy=LOOPBACK_ALLOWED, thread_count=2), tar_prefix="r1-"
    )
    assert list(result.tars) == ["r1-00000.tar"]
    with tarfile.open(result.tars["r1-00000.tar"]) as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    rows = result.rows
    assert rows["status"].to_list() == [Status.SUCCESS] * 5
    for key, size in zip(rows["key"], rows["bytes"]):
        assert members[f"{key}.jpg"] == size
        assert f"{key}.txt" in members
    assert rows["original_width"].to_list() == [20, 21, 22, 23, 24]
    assert rows["sha256"].null_count() == 0

    samples = {s.key: s for s in iter_samples(result.tars.values())}
    assert set(samples) == set(rows["key"])
    for key, uid, caption in zip(rows["key"], rows["uid"], rows["caption"]):
        assert samples[key].caption == caption and samples[key].meta["uid"] == uid
        assert Image.open(io.BytesIO(samples[key].image)).size == (samples[key].meta["width"], 16)


def test_redirect_to_a_refused_address_is_refused(routes_server: RoutesServer, tmp_path: Path) -> None:
    target = routes_server.add("/real.png", png_bytes(20, 20), Content_Type="image/png")
    hop = routes_server.add("/hop", status=302, Location=target.replace("127.0.0.1", "127.0.0.2"))
    local_file = routes_server.add("/to-file", status=302, Location="file:///etc/hostname")
    fine = routes_server.add("/fine", status=302, Location=target)
    ledger = run(raw_frame([hop, local_file, fine]), tmp_path)
    assert ledger["status"].to_list() == [Status.REFUSED, Status.REFUSED, Status.SUCCESS]
    assert routes_server.hits.get("/real.png") == 1


def test_loopback_is_refused_unless_allowed(routes_server: RoutesServer, tmp_path: Path) -> None:
    url = routes_server.add("/a.png", png_bytes(20, 20), Content_Type="image/png")
    ledger = run(raw_frame([url]), tmp_path, policy=GuardPolicy())
    assert ledger["status"].to_list() == [Status.REFUSED]
    assert "127.0.0.1" in ledger["error"][0]
    assert "/a.png" not in routes_server.hits


def test_body_without_length_is_capped_while_reading(routes_server: RoutesServer) -> None:
    body = png_bytes(300, 300, seed=9)
    url = routes_server.add("/unsized.png", body, Content_Type="image/png", Content_Length="")
    policy = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=len(body) - 1)
    with guarded_urlopen(policy), urllib.request.urlopen(url, timeout=5) as response:
        with pytest.raises(GuardError, match="too large"):
            response.read()


def test_guard_restores_the_previous_opener(routes_server: RoutesServer) -> None:
    before = urllib.request._opener
    with guarded_urlopen(GuardPolicy()):
        assert urllib.request._opener is not before
    assert urllib.request._opener is before


def test_a_dripping_server_fails_its_row_as_timeout_within_the_deadline(
    drip_server: DripServer, routes_server: RoutesServer, tmp_path: Path
) -> None:
    deadline_s = 3.0
    urls = [
        drip_server.url("/body"),
        drip_server.url("/headers"),
        routes_server.add("/ok.png", png_bytes(30, 20), Content_Type="image/png"),
    ]
    policy = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}), deadline_s=deadline_s)

    started = time.monotonic()
    ledger = run(raw_frame(urls), tmp_path, policy=policy, timeout_s=10.0)
    took = time.monotonic() - started

    assert took < deadline_s + 5, f"the shard took {took:.1f} s"
    assert ledger["status"].to_list() == [Status.TIMEOUT, Status.TIMEOUT, Status.SUCCESS]
    for error in ledger["error"].head(2):
        assert deadline_s <= elapsed_in(error, deadline_s) < deadline_s + 5


def resolving(names: dict[str, list[str]]):  # noqa: ANN201 - a getaddrinfo stand-in
    """A resolver answering `names` with the given IPv4 addresses, in order, and every other host as usual."""

    def resolve(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port)) for ip in names[host]]
        return socket.getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    return resolve


def test_a_host_whose_first_address_refuses_is_downloaded_through_its_second(
    routes_server: RoutesServer, tmp_path: Path
) -> None:
    port = routes_server.server.server_port
    routes_server.add("/a.png", png_bytes(30, 20), Content_Type="image/png")
    names = {
        "fallback.test": ["127.0.0.2", "127.0.0.1"],  # nothing listens on 127.0.0.2: a real connection refused
        "dead.test": ["127.0.0.2", "127.0.0.3"],
        "mixed.test": ["127.0.0.1", "127.0.0.2"],  # allowed only by address, and the second is not allowed
    }
    policy = GuardPolicy(allow_hosts=frozenset({"fallback.test", "dead.test", "127.0.0.1"}), resolver=resolving(names))
    urls = [f"http://{host}:{port}/a.png" for host in names]

    ledger = run(raw_frame(urls), tmp_path, policy=policy)

    assert ledger["status"].to_list() == [Status.SUCCESS, Status.FAILED_TO_DOWNLOAD, Status.REFUSED]
    errors = ledger["error"].to_list()
    assert errors[0] is None
    assert "refused" in errors[1].lower()  # the last address's error, as socket.create_connection raises it
    assert "127.0.0.2" in errors[2]  # every address is checked before any is tried
    assert routes_server.hits["/a.png"] == 1

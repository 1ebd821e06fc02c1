"""Reading tars never unpickles a member, whatever the tar holds."""

from __future__ import annotations

import os
import pickle
import tarfile
from io import BytesIO
from pathlib import Path

from ca_platform.ingest.webdataset_io import iter_samples
from tests.conftest import png_bytes


class _Trap:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, BytesIO(data))


def test_pickled_members_are_never_loaded(tmp_path: Path) -> None:
    trap = tmp_path / "pwned"
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "000.png", png_bytes(8, 8))
        _add(tar, "000.txt", b"a red circle")
        _add(tar, "000.pyd", pickle.dumps(_Trap(str(trap))))
        _add(tar, "000.pth", pickle.dumps(_Trap(str(trap))))
    samples = list(iter_samples([tar_path]))
    assert [(s.key, s.image_format, s.caption) for s in samples] == [("000", "png", "a red circle")]
    assert os.environ["WDS_SECURE"] == "1"
    assert not trap.exists()


def test_strided_reading_splits_the_samples_of_iter_samples_exactly(tmp_path: Path) -> None:
    import webdataset as wds

    from ca_platform.ingest.webdataset_io import iter_samples_strided

    tars = []
    for t in range(2):
        tars.append(tmp_path / f"{t}.tar")
        with wds.TarWriter(str(tars[-1])) as writer:
            for i in range(5):
                key = f"{t}-é-{i:03d}"  # a non-ASCII name: tarfile writes it in a pax header
                writer.write({"__key__": key, "png": png_bytes(8, 8, seed=i), "txt": f"c{i}", "json": {"uid": key}})
    expected = list(iter_samples(tars))
    for parts in (1, 2, 3):
        split = [[s for _, s in iter_samples_strided(tars, part, parts)] for part in range(parts)]
        assert sorted((s for part in split for s in part), key=lambda s: s.key) == sorted(expected, key=lambda s: s.key)
        assert [s.key for s in split[0]] == [s.key for s in expected[::parts]]

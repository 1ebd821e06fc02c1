"""Reading tars never unpickles a member, whatever the tar holds."""

from __future__ import annotations

import os
import pickle
import tarfile
from io import BytesIO
from pathlib import Path

from ca_platform.webdataset_io import iter_samples
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

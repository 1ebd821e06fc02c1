"""Where pools and platform data live: a local directory or an `s3://bucket/prefix`, behind one interface.

Objects are addressed by a relative key ("downloads/shard-00000/rows.parquet"). Every `put_file` is
atomic for readers: locally the file is written aside and renamed into place; on S3 a PUT is atomic per
object. Multi-object outputs are published with their index file last (see `publish`), so a killed run
never leaves anything a reader would take as complete.

Small documents that several processes race for (locks) use the conditional operations `create`,
`read`, `replace` and `delete_if`, each judged by a tag of the content the caller last saw: on S3 the
ETag with If-None-Match / If-Match, locally a hash of the bytes with atomic link and rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    fingerprint: str  # changes when the content may have changed (mtime+size locally, ETag on S3)


class DataStore(Protocol):
    uri: str

    def list(self, prefix: str = "") -> list[StoredObject]: ...
    def exists(self, key: str) -> bool: ...
    def put_file(self, local: Path, key: str, consume: bool = False) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    def uri_of(self, key: str) -> str: ...
    def create(self, key: str, data: bytes) -> str | None: ...
    def read(self, key: str) -> tuple[bytes, str] | None: ...
    def replace(self, key: str, data: bytes, tag: str) -> str | None: ...
    def delete_if(self, key: str, tag: str) -> bool: ...


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


class LocalStore:
    """A directory on local disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the store root {self.root}")
        return path

    def list(self, prefix: str = "") -> list[StoredObject]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            candidates: Iterable[Path] = [base]
        elif base.is_dir():
            candidates = (p for p in base.rglob("*") if p.is_file())
        else:
            return []
        objects = []
        for path in candidates:
            stat = path.stat()
            key = path.relative_to(self.root).as_posix()
            objects.append(StoredObject(key, stat.st_size, f"{stat.st_mtime_ns}-{stat.st_size}"))
        return sorted(objects, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, local: Path, key: str, consume: bool = False) -> None:
        """Write aside, then rename into place; with `consume`, a file on the same filesystem is just renamed."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if consume and local.stat().st_dev == dest.parent.stat().st_dev:
            os.replace(local, dest)
            return
        aside = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(local, aside)
            os.replace(aside, dest)
        finally:
            aside.unlink(missing_ok=True)

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def uri_of(self, key: str) -> str:
        return str(self._path(key))

    @staticmethod
    def _tag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def _aside(self, dest: Path) -> Path:
        return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")

    def create(self, key: str, data: bytes) -> str | None:
        """Write `data` at `key` only if nothing is there (a hard link of a complete file: atomic, exclusive);
        its tag, or None when the key exists."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        aside = self._aside(dest)
        aside.write_bytes(data)
        try:
            os.link(aside, dest)
        except FileExistsError:
            return None
        finally:
            aside.unlink(missing_ok=True)
        return self._tag(data)

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, self._tag(data)

    def replace(self, key: str, data: bytes, tag: str) -> str | None:
        """Overwrite `key` if its content still has `tag`; the new tag, or None when it changed or vanished.

        Check and rename are two steps locally: meant for a document only its owner rewrites (a lock's
        heartbeat), where the check catches a lock that was broken and taken over meanwhile.
        """
        current = self.read(key)
        if current is None or current[1] != tag:
            return None
        dest = self._path(key)
        aside = self._aside(dest)
        aside.write_bytes(data)
        os.replace(aside, dest)
        return self._tag(data)

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete `key` if its content still has `tag`. The file is first renamed away (only one of several
        racing callers gets it), then checked; a file that changed meanwhile is put back."""
        dest = self._path(key)
        claimed = self._aside(dest)
        try:
            os.rename(dest, claimed)
        except FileNotFoundError:
            return False
        try:
            if self._tag(claimed.read_bytes()) == tag:
                return True
            try:
                os.link(claimed, dest)
            except FileExistsError:
                pass  # someone created a new one meanwhile: theirs stands
            return False
        finally:
            claimed.unlink(missing_ok=True)


class S3Store:
    """A prefix of an S3 bucket, through a boto3 client (from dagster-aws's S3Resource in the platform)."""

    def __init__(self, uri: str, client: Any) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = client
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def list(self, prefix: str = "") -> list[StoredObject]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        objects = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                objects.append(StoredObject(item["Key"][strip:], item["Size"], item["ETag"].strip('"')))
        return sorted(objects, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(key), MaxKeys=1)
        return any(item["Key"] == self._key(key) for item in response.get("Contents", []))

    def put_file(self, local: Path, key: str, consume: bool = False) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        aside = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            self.client.download_file(self.bucket, self._key(key), str(aside))
            os.replace(aside, local)
        finally:
            aside.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def local_path(self, key: str) -> Path | None:
        return None

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _conditional(self, call: Callable[..., Any], **kwargs: Any) -> Any | None:
        """`call`'s response, or None when S3 refused it for a failed condition (or a missing key)."""
        try:
            return call(Bucket=self.bucket, **kwargs)
        except self.client.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise

    def create(self, key: str, data: bytes) -> str | None:
        response = self._conditional(self.client.put_object, Key=self._key(key), Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def read(self, key: str) -> tuple[bytes, str] | None:
        response = self._conditional(self.client.get_object, Key=self._key(key))
        return None if response is None else (response["Body"].read(), response["ETag"])

    def replace(self, key: str, data: bytes, tag: str) -> str | None:
        response = self._conditional(self.client.put_object, Key=self._key(key), Body=data, IfMatch=tag)
        return None if response is None else response["ETag"]

    def delete_if(self, key: str, tag: str) -> bool:
        return self._conditional(self.client.delete_object, Key=self._key(key), IfMatch=tag) is not None


def open_store(uri: str, s3_client: Callable[[], Any] | None = None) -> DataStore:
    """A store for `uri`: `s3://bucket/prefix` (needs `s3_client`) or a local directory."""
    if is_s3_uri(uri):
        if s3_client is None:
            raise ValueError(f"{uri} is on S3 but no S3 client was configured")
        return S3Store(uri, s3_client())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))


FAULT_ENV = "CA_PLATFORM_FAULT"
FAULT_ONCE_ENV = "CA_PLATFORM_FAULT_ONCE"


def fault_point(name: str) -> None:
    """A named point where a write can be interrupted; the process kills itself there when the environment
    variable CA_PLATFORM_FAULT names it. The crash-point tests use it to prove that a run killed at any
    such point leaves no half-published output and loses nothing."""
    if os.environ.get(FAULT_ENV) == name and _first_fault():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_fault() -> bool:
    """With CA_PLATFORM_FAULT_ONCE naming a file, only the first process to get there dies (it creates the
    file): how the retry tests kill a worker once and watch the engine's retry succeed."""
    marker = os.environ.get(FAULT_ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def publish(
    store: DataStore, files: dict[str, Path], index_key: str, index_file: Path, fault_name: str = "publish"
) -> None:
    """Move `files` (key -> local path) into the store, then the index that names them, last.

    Readers only trust what an index lists, so until the index lands they keep seeing the previous
    complete version; file keys must therefore be new (e.g. carry a run token) rather than overwritten.
    The local files are consumed.
    """
    for key, path in files.items():
        store.put_file(path, key, consume=True)
    fault_point(f"{fault_name}:mid-publish")
    store.put_file(index_file, index_key, consume=True)


def _in_place(store: DataStore, key: str, exists: Callable[[Path], bool]) -> Path | None:
    """The local path of `key` in a local store (None on S3); missing there is an error naming it."""
    path = store.local_path(key)
    if path is not None and not exists(path):
        raise FileNotFoundError(f"{store.uri_of(key)} does not exist")
    return path


def fetch_to_local(store: DataStore, key: str, scratch: Path) -> Path:
    """A local path holding `key`: the file itself for a local store, else a copy under `scratch`."""
    path = _in_place(store, key, Path.is_file)
    if path is not None:
        return path
    local = scratch / key
    store.get_file(key, local)
    return local


def read_json(store: DataStore, key: str, scratch: Path) -> Any | None:
    """The JSON document at `key`, or None when there is none."""
    if not store.exists(key):
        return None
    return json.loads(fetch_to_local(store, key, scratch).read_text())


def write_json(store: DataStore, key: str, document: Any, scratch: Path) -> None:
    """Write a small JSON document (a pointer such as "the current model version") atomically."""
    local = scratch / f"{uuid.uuid4().hex}.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(document, indent=2, sort_keys=True))
    store.put_file(local, key, consume=True)


def publish_folder(store: DataStore, folder: Path, prefix: str, index_name: str | None = None) -> None:
    """Move a local folder's files under `prefix`; the one named `index_name`, if any, goes last (see `publish`)."""
    files = {f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*")) if p.is_file()}
    index_key = f"{prefix}/{index_name}" if index_name else None
    for key, path in files.items():
        if key != index_key:
            store.put_file(path, key, consume=True)
    if index_key is not None:
        store.put_file(files[index_key], index_key, consume=True)


def fetch_folder(store: DataStore, prefix: str, cache: Path) -> Path:
    """A local folder with the objects under `prefix`: the folder itself for a local store, else a cached copy.

    Only suitable for immutable prefixes (content-addressed versions): a cached copy is reused as is.
    """
    path = _in_place(store, prefix, Path.is_dir)
    if path is not None:
        return path
    local = cache / prefix
    if not local.is_dir():
        objects = store.list(prefix + "/")
        if not objects:
            raise FileNotFoundError(f"{store.uri_of(prefix)} does not exist")
        staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        for obj in objects:
            store.get_file(obj.key, staging / obj.key[len(prefix) + 1 :])
        os.replace(staging, local)
    return local

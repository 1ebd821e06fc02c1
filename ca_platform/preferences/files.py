"""Preference files: reading and validating them, and fetching their images.

A preference file holds one record per image, ``{"image": ..., "captions": [...], "ranking": [...]}``,
where ``ranking[i]`` is the rank of ``captions[i]`` (1 best, equal ranks tied), as JSONL or parquet. People
write these files by hand or export them from labelling tools, so every row is checked and all problems
are reported at once, each naming the file, row and field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import json
import os
import tempfile
import urllib.error
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ca_platform.ingest.download_guard import GuardPolicy, build_opener
from ca_platform.preferences.pairs import PreferenceItem

FIELDS = ("image", "captions", "ranking")
MAX_LISTED_PROBLEMS = 20
_URL_SCHEMES = ("http", "https")
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


class PreferenceFormatError(ValueError):
    """A preference file (or one of its images) is unusable; `problems` lists every reason found.

    Each problem reads ``<file>: row <n>: field '<name>': <what is wrong>``, so a user can fix the whole
    file in one go rather than one error per run.
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(f"{source}: {problem}" for problem in problems)
        lines = list(self.problems[:MAX_LISTED_PROBLEMS])
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{source}: {len(self.problems)} problems\n" + "\n".join(f"  {line}" for line in lines)
        super().__init__(message)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _record_problems(record: object) -> list[str]:
    """What is wrong with one record, as ``field '<name>': ...`` phrases (empty when it is valid)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object with fields {', '.join(FIELDS)}, got {_type_name(record)}"]
    problems = [f"field '{name}': missing" for name in FIELDS if name not in record]

    image = record.get("image")
    if "image" in record:
        if not isinstance(image, str):
            problems.append(f"field 'image': expected a string, got {_type_name(image)}")
        elif not image.strip():
            problems.append("field 'image': empty")

    captions = record.get("captions")
    captions_ok = False
    if "captions" in record:
        if not isinstance(captions, list):
            problems.append(f"field 'captions': expected a list of strings, got {_type_name(captions)}")
        elif len(captions) < 2:
            problems.append(f"field 'captions': needs at least 2 captions to rank, got {len(captions)}")
        else:
            before = len(problems)
            for number, caption in enumerate(captions, start=1):
                if not isinstance(caption, str):
                    problems.append(f"field 'captions': caption {number} is {_type_name(caption)}, not a string")
                elif not caption.strip():
                    problems.append(f"field 'captions': caption {number} is empty")
            captions_ok = len(problems) == before

    ranking = record.get("ranking")
    if "ranking" in record:
        if not isinstance(ranking, list):
            problems.append(f"field 'ranking': expected a list of integers, got {_type_name(ranking)}")
            return problems
        before = len(problems)
        for number, rank in enumerate(ranking, start=1):
            if isinstance(rank, bool) or not isinstance(rank, int):
                problems.append(f"field 'ranking': rank {number} is {rank!r} ({_type_name(rank)}), not an integer")
            elif rank < 1:
                problems.append(f"field 'ranking': rank {number} is {rank}; ranks start at 1 (best)")
        if len(problems) > before:
            return problems
        if captions_ok and len(ranking) != len(captions):
            problems.append(f"field 'ranking': length {len(ranking)} differs from {len(captions)} captions")
        elif len(ranking) >= 2 and len(set(ranking)) == 1:
            problems.append(f"field 'ranking': all {len(ranking)} ranks are equal, so the row orders no pair")
    return problems


def _jsonl_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed object or the parse error) of each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PreferenceFormatError(path.name, [f"not UTF-8 text ({err})"]) from err
    records: list[tuple[int, object]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            records.append((number, err))
    return records


def _parquet_records(path: Path) -> list[tuple[int, object]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise PreferenceFormatError(path.name, [f"not a readable parquet file ({err})"]) from err
    missing = [name for name in FIELDS if name not in table.column_names]
    if missing:
        raise PreferenceFormatError(
            path.name, [f"field '{name}': column missing (has {table.column_names})" for name in missing]
        )
    return list(enumerate(table.select(list(FIELDS)).to_pylist(), start=1))


def read_preferences(path: Path) -> list[PreferenceItem]:
    """Every row of a ``.jsonl`` or ``.parquet`` preference file, validated; extra fields are ignored.

    Raises PreferenceFormatError listing all bad rows, so one round of fixes makes the file load.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".parquet":
        records = _parquet_records(path)
    else:
        raise PreferenceFormatError(
            path.name, [f"unsupported file type {suffix or '(none)'!r}: use .jsonl or .parquet"]
        )
    if not records:
        raise PreferenceFormatError(path.name, ["no rows"])
    items, problems = [], []
    for row, record in records:
        if isinstance(record, json.JSONDecodeError):
            problems.append(f"row {row}: invalid JSON ({record.msg} at column {record.colno})")
            continue
        row_problems = _record_problems(record)
        if row_problems:
            problems.extend(f"row {row}: {problem}" for problem in row_problems)
            continue
        assert isinstance(record, dict)
        items.append(
            PreferenceItem(
                image=record["image"], captions=tuple(record["captions"]), ranking=tuple(record["ranking"]), row=row
            )
        )
    if problems:
        raise PreferenceFormatError(path.name, problems)
    return items


def write_preferences(
    items: Sequence[PreferenceItem], path: Path, extras: Sequence[Mapping[str, Any]] | None = None
) -> Path:
    """Write items as a preference file (JSONL, or parquet for a ``.parquet`` path).

    ``extras[k]`` adds fields to row k (readers ignore them), e.g. where each generated caption came from.
    """
    path = Path(path)
    if extras is not None and len(extras) != len(items):
        raise ValueError(f"{len(extras)} extras for {len(items)} items")
    records = [
        {"image": item.image, "captions": list(item.captions), "ranking": list(item.ranking), **(extra or {})}
        for item, extra in zip(items, extras or [None] * len(items))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix.lower() == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"cannot write preferences to {path.name}: use .jsonl or .parquet")
    return path


class _FetchFailed(Exception):
    """Why one URL gave no image; turned into a PreferenceFormatError for every row using it."""


def _fetch_image(url: str, dest_dir: Path, policy: GuardPolicy, timeout_s: float) -> Path:
    """Download `url` through the guard into `dest_dir` (once: an earlier copy is reused).

    `timeout_s` bounds each socket operation and the policy's `deadline_s` the whole fetch, so a host that
    drips bytes fails its rows (as ``deadline exceeded: ...``) instead of holding the run.
    """
    stem = hashlib.sha1(url.encode("utf-8")).hexdigest()
    for existing in sorted(dest_dir.glob(f"{stem}.*")):
        return existing
    try:
        with build_opener(policy).open(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        raise _FetchFailed(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _FetchFailed(str(err.reason)) from err
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _FetchFailed(f"{type(err).__name__}: {err}") from err
    try:
        with Image.open(io.BytesIO(body)) as image:
            image_format = image.format or ""
            image.verify()
    except UnidentifiedImageError as err:
        raise _FetchFailed(f"body of {len(body)} bytes is not an image Pillow can identify") from err
    except Exception as err:  # Pillow raises many types (SyntaxError, struct.error, ...) for broken data
        raise _FetchFailed(f"body is not a decodable image ({type(err).__name__}: {err})") from err
    target = dest_dir / (stem + _EXTENSIONS.get(image_format, f".{image_format.lower() or 'img'}"))
    handle, temporary = tempfile.mkstemp(dir=dest_dir, prefix=f".{stem}-")
    with os.fdopen(handle, "wb") as out:
        out.write(body)
    os.replace(temporary, target)  # a half-written file never looks like a finished download
    return target


def resolve_images(
    items: Sequence[PreferenceItem],
    base_dir: Path,
    dest_dir: Path,
    policy: GuardPolicy,
    *,
    source: str = "preferences",
    timeout_s: float = 10.0,
    workers: int = 4,
) -> list[PreferenceItem]:
    """The items with `image` turned into an absolute local path.

    Relative paths are taken from `base_dir` (the preference file's folder). http(s) URLs are fetched
    through the platform's download guard, which refuses private addresses unless `policy` allows the host
    and caps bytes, pixels and each URL's total time, and must decode as images; they are saved in `dest_dir` as
    ``sha1(url).<ext>``, each URL once. Other schemes (file:, ftp:, data:) are refused, since they would
    read files or services the guard exists to keep out. All problems are raised together, named by
    `source` (the preference file's name) and row.
    """
    base_dir, dest_dir = Path(base_dir), Path(dest_dir)
    problems: list[str] = []
    urls = sorted({item.image for item in items if urlsplit(item.image).scheme.lower() in _URL_SCHEMES})
    fetched: dict[str, Path | str] = {}
    if urls:
        dest_dir.mkdir(parents=True, exist_ok=True)

        def fetch(url: str) -> Path | str:
            try:
                return _fetch_image(url, dest_dir, policy, timeout_s)
            except _FetchFailed as err:
                return str(err)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(urls)))) as pool:
            fetched = dict(zip(urls, pool.map(fetch, urls)))

    resolved = []
    for item in items:
        scheme = urlsplit(item.image).scheme.lower()
        where = f"row {item.row}: field 'image'"
        if scheme in _URL_SCHEMES:
            outcome = fetched[item.image]
            if isinstance(outcome, str):
                problems.append(f"{where}: cannot fetch {item.image!r}: {outcome}")
                continue
            path = outcome.resolve()
        elif scheme:
            problems.append(f"{where}: scheme {scheme!r} refused in {item.image[:120]!r}; use a local path or http(s)")
            continue
        else:
            path = Path(item.image)
            path = (path if path.is_absolute() else base_dir / path).resolve()
            if not path.is_file():
                problems.append(f"{where}: image file not found: {path}")
                continue
        resolved.append(dataclasses.replace(item, image=str(path)))
    if problems:
        raise PreferenceFormatError(source, problems)
    return resolved

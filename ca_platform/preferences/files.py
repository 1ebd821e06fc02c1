"""Preference files: reading and validating them, and fetching their images.

A preference file holds one record per image, ``{"image": ..., "captions": [...], "ranking": [...]}``,
where ``ranking[i]`` is the rank of ``captions[i]`` (1 best, equal ranks tied), as JSONL or parquet. People
write these files by hand or export them from labelling tools, so every row is checked and all problems
are reported at once, each naming the file, row and field.

`validate_preference_file` is the one entry point that checks a file before anything uses it: the format of
every row and every image (local files confined to the file's folder or a configured root, URLs fetched behind
the download guard; each must decode within the guard's caps), all problems in one error.
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
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ca_platform.ingest.download_guard import TOO_LARGE_PREFIX, GuardPolicy, build_opener
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


def _read_rows(path: Path) -> tuple[list[PreferenceItem], list[tuple[int, str]]]:
    """The file's valid rows as items, and (row, problem) for every invalid one.

    Raises PreferenceFormatError at once only when the file as a whole is unusable (missing, unreadable, no rows).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise PreferenceFormatError(
            path.name, [f"unsupported file type {suffix or '(none)'!r}: use .jsonl or .parquet"]
        )
    if not path.is_file():
        raise PreferenceFormatError(path.name, [f"no such file: {path}"])
    records = _jsonl_records(path) if suffix == ".jsonl" else _parquet_records(path)
    if not records:
        raise PreferenceFormatError(path.name, ["no rows"])
    items: list[PreferenceItem] = []
    problems: list[tuple[int, str]] = []
    for row, record in records:
        if isinstance(record, json.JSONDecodeError):
            problems.append((row, f"invalid JSON ({record.msg} at column {record.colno})"))
            continue
        row_problems = _record_problems(record)
        if row_problems:
            problems.extend((row, problem) for problem in row_problems)
            continue
        assert isinstance(record, dict)
        items.append(
            PreferenceItem(
                image=record["image"], captions=tuple(record["captions"]), ranking=tuple(record["ranking"]), row=row
            )
        )
    return items, problems


def _by_row(problems: Sequence[tuple[int, str]]) -> list[str]:
    """``row <n>: ...`` lines in row order (a row's own problems keep their order)."""
    return [f"row {row}: {problem}" for row, problem in sorted(problems, key=lambda entry: entry[0])]


def read_preferences(path: Path) -> list[PreferenceItem]:
    """Every row of a ``.jsonl`` or ``.parquet`` preference file, format-checked; extra fields are ignored.

    Raises PreferenceFormatError listing all bad rows, so one round of fixes makes the file load. Images are
    not looked at: a file from a user goes through `validate_preference_file` instead.
    """
    items, problems = _read_rows(path)
    if problems:
        raise PreferenceFormatError(Path(path).name, _by_row(problems))
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


class _ImageUnusable(Exception):
    """Why one image (a local file or a URL's body) cannot be used; reported for every row naming it."""


def _decoded_format(body: bytes, policy: GuardPolicy) -> str:
    """The format of the image in `body`, decoded whole once its header shows it within the pixel cap."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as image:
                width, height = image.size
                if width * height > policy.max_pixels:
                    raise _ImageUnusable(
                        f"{TOO_LARGE_PREFIX} image of {width}x{height} pixels exceeds cap {policy.max_pixels}"
                    )
                image.load()  # a truncated or corrupt body fails here, not later in training
                return image.format or ""
    except _ImageUnusable:
        raise
    except Image.DecompressionBombError as err:
        raise _ImageUnusable(f"{TOO_LARGE_PREFIX} {err}") from err
    except UnidentifiedImageError as err:
        raise _ImageUnusable(f"{len(body)} bytes that are not an image Pillow can identify") from err
    except Exception as err:  # Pillow raises many types (SyntaxError, struct.error, ...) for broken data
        raise _ImageUnusable(f"not a decodable image ({type(err).__name__}: {err})") from err


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
        raise _ImageUnusable(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _ImageUnusable(str(err.reason)) from err
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _ImageUnusable(f"{type(err).__name__}: {err}") from err
    image_format = _decoded_format(body, policy)
    target = dest_dir / (stem + _EXTENSIONS.get(image_format, f".{image_format.lower() or 'img'}"))
    handle, temporary = tempfile.mkstemp(dir=dest_dir, prefix=f".{stem}-")
    with os.fdopen(handle, "wb") as out:
        out.write(body)
    os.replace(temporary, target)  # a half-written file never looks like a finished download
    return target


def _check_local_image(path: Path, policy: GuardPolicy) -> Path:
    """`path` (already confined to the allowed root) once it is a file within the byte cap that decodes."""
    if not path.is_file():
        raise _ImageUnusable(f"image file not found: {path}")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise _ImageUnusable(f"{path}: {TOO_LARGE_PREFIX} file of {size} bytes exceeds cap {policy.max_bytes}")
    try:
        _decoded_format(path.read_bytes(), policy)
    except _ImageUnusable as err:
        raise _ImageUnusable(f"{path}: {err}") from err
    return path


def _resolve_images(
    items: Sequence[PreferenceItem],
    base_dir: Path,
    dest_dir: Path,
    policy: GuardPolicy,
    image_root: Path | None,
    timeout_s: float,
    workers: int,
) -> tuple[list[PreferenceItem], list[tuple[int, str]]]:
    """The items whose image is usable, with `image` an absolute local path, and (row, problem) for the rest."""
    root = Path(image_root if image_root is not None else base_dir).resolve()
    allowed = "the configured image root" if image_root is not None else "the preference file's folder"
    problems: list[tuple[int, str]] = []
    targets: list[tuple[PreferenceItem, str | Path]] = []  # a URL to fetch, or a confined local path to check
    for item in items:
        scheme = urlsplit(item.image).scheme.lower()
        if scheme in _URL_SCHEMES:
            targets.append((item, item.image))
        elif scheme:
            problems.append(
                (
                    item.row,
                    f"field 'image': scheme {scheme!r} refused in {item.image[:120]!r}; use a local path or http(s)",
                )
            )
        else:
            path = Path(item.image)
            path = (path if path.is_absolute() else base_dir / path).resolve()  # symlinks and '..' followed
            if not path.is_relative_to(root):
                problems.append(
                    (
                        item.row,
                        f"field 'image': refused: {item.image[:200]!r} lies outside {root} ({allowed}, where "
                        "local images must lie)",
                    )
                )
            else:
                targets.append((item, path))

    def check(target: str | Path) -> Path | str:
        try:
            if isinstance(target, Path):
                return _check_local_image(target, policy)
            return _fetch_image(target, dest_dir, policy, timeout_s)
        except _ImageUnusable as err:
            return str(err)

    unique = sorted({target for _, target in targets}, key=str)
    if any(isinstance(target, str) for target in unique):
        dest_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str | Path, Path | str] = {}
    if unique:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
            outcomes = dict(zip(unique, pool.map(check, unique)))

    resolved = []
    for item, target in targets:
        outcome = outcomes[target]
        if isinstance(outcome, Path):
            resolved.append(dataclasses.replace(item, image=str(outcome.resolve())))
        elif isinstance(target, str):
            problems.append((item.row, f"field 'image': cannot fetch {target!r}: {outcome}"))
        else:
            problems.append((item.row, f"field 'image': {outcome}"))
    return resolved, problems


def resolve_images(
    items: Sequence[PreferenceItem],
    base_dir: Path,
    dest_dir: Path,
    policy: GuardPolicy,
    *,
    image_root: Path | None = None,
    source: str = "preferences",
    timeout_s: float = 10.0,
    workers: int = 4,
) -> list[PreferenceItem]:
    """The items with `image` turned into an absolute local path to a checked image.

    Relative paths are taken from `base_dir` (the preference file's folder); every local path, once symlinks
    and ``..`` are resolved, must lie under `image_root` (default `base_dir`), so a file cannot pull
    ``/etc/passwd`` or ``../../secret.txt`` into the data root: such paths are refused and never opened.
    http(s) URLs are fetched through the platform's download guard, which refuses private addresses unless
    `policy` allows the host and caps bytes, pixels and each URL's total time; they are saved in `dest_dir` as
    ``sha1(url).<ext>``, each URL once. Other schemes (file:, ftp:, data:) are refused, since they would read
    files or services the guard exists to keep out. Every image, local or fetched, must decode whole within
    the policy's byte and pixel caps. All problems are raised together, named by `source` (the preference
    file's name) and row.
    """
    resolved, problems = _resolve_images(items, Path(base_dir), Path(dest_dir), policy, image_root, timeout_s, workers)
    if problems:
        raise PreferenceFormatError(source, _by_row(problems))
    return resolved


def validate_preference_file(
    path: Path,
    policy: GuardPolicy,
    fetch_dir: Path,
    *,
    image_root: Path | str | None = None,
    timeout_s: float = 10.0,
    workers: int = 4,
) -> list[PreferenceItem]:
    """Every row of the preference file at `path`, its format and its image checked, ready to stage.

    Runs before anything else uses the file (before `ca-platform run` downloads a shard, and before staging
    copies an image), so one round of fixes is enough: format problems and image problems of every row come in
    one PreferenceFormatError, in row order (a row with format problems skips the image check). Images are
    checked as `resolve_images` describes (local ones under `image_root`, default the file's own folder; URL
    ones fetched into `fetch_dir`); the items returned point at the checked local files.
    """
    path = Path(path)
    items, problems = _read_rows(path)
    resolved, image_problems = _resolve_images(
        items,
        path.parent,
        Path(fetch_dir),
        policy,
        None if image_root is None else Path(image_root).expanduser(),
        timeout_s,
        workers,
    )
    if problems or image_problems:
        raise PreferenceFormatError(path.name, _by_row([*problems, *image_problems]))
    return resolved

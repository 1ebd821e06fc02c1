"""A preference file turned into a self-contained, content-addressed preference set.

The user's file points at local images (relative or absolute paths, confined to its folder or a configured
root) or http URLs. Staging validates the whole file first, then copies every image into the set's own folder
under a content-hash name and rewrites the file to point there, so the set's version (the hash of the folder)
changes exactly when the preferences or their images do, and training reads only local files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ca_platform import layout
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.models.checkpoints import content_version
from ca_platform.preferences.files import read_preferences, validate_preference_file, write_preferences
from ca_platform.preferences.pairs import PreferenceItem, preference_pairs, split_by_image
from ca_platform.storage import DataStore, fetch_folder, publish_folder, read_json, write_json

IMAGES_DIR = "images"


def stage_preferences(
    source: Path, folder: Path, policy: GuardPolicy, image_root: Path | str | None = None
) -> tuple[str, list[PreferenceItem]]:
    """Validate `source` whole (format and every image), then gather its images into `folder`; return the set's
    version and its items.

    Nothing is copied unless every row passes, and only images `validate_preference_file` checked are copied:
    local ones under `image_root` (default the file's folder) that decode within the guard's caps.
    """
    resolved = validate_preference_file(source, policy, folder / ".fetched", image_root=image_root)
    images = folder / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    staged = []
    for item in resolved:
        path = Path(item.image)
        body = path.read_bytes()
        name = hashlib.sha1(body).hexdigest()[:20] + path.suffix.lower()
        if not (images / name).exists():
            (images / name).write_bytes(body)  # the bytes hashed are the bytes staged
        staged.append(dataclasses.replace(item, image=f"{IMAGES_DIR}/{name}"))
    shutil.rmtree(folder / ".fetched", ignore_errors=True)
    write_preferences(staged, folder / layout.PREFERENCES_FILE)
    return content_version(folder), staged


def load_preference_split(
    folder: Path, holdout_fraction: float, seed: int
) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    """(train, held out) items of a staged set with absolute image paths.

    The split hashes the staged image names, which are content hashes, so it does not depend on where
    the set is stored or cached.
    """
    train, heldout = split_by_image(read_preferences(folder / layout.PREFERENCES_FILE), holdout_fraction, seed)

    def absolute(items: list[PreferenceItem]) -> list[PreferenceItem]:
        return [dataclasses.replace(item, image=str(folder / item.image)) for item in items]

    return absolute(train), absolute(heldout)


class NoPreferencesError(LookupError):
    """No preference set has been staged under the data root yet."""


@dataclass(frozen=True)
class PublishedPreferences:
    version: str
    images: int
    ordered_pairs: int  # caption pairs people ranked apart
    tied_pairs: int  # caption pairs people ranked equal


def publish_preference_set(
    store: DataStore, source: str | Path, policy: GuardPolicy, scratch: Path, image_root: Path | str | None = None
) -> PublishedPreferences:
    """Stage the file `source` (images given by URL fetched behind the download guard `policy`, local ones only
    from under `image_root`, default the file's folder), publish the set under its version (the preference file
    last) and make it the current one."""
    version, items = stage_preferences(Path(source), scratch / "set", policy, image_root)
    publish_folder(store, scratch / "set", layout.preferences_prefix(version), index_name=layout.PREFERENCES_FILE)
    write_json(store, layout.CURRENT_PREFERENCES_KEY, {"version": version, "source": str(source)}, scratch)
    ordered = sum(len(preference_pairs(i.ranking, "skip")) for i in items)
    tied = sum(len(preference_pairs(i.ranking, "soft")) for i in items) - ordered
    return PublishedPreferences(version, len(items), ordered, tied)


def current_preference_set(store: DataStore, scratch: Path) -> str:
    """The version of the current preference set."""
    document = read_json(store, layout.CURRENT_PREFERENCES_KEY, scratch)
    if document is None:
        raise NoPreferencesError(f"no preference set yet under {store.uri}: materialize preference_data first")
    return document["version"]


def current_preference_split(
    store: DataStore, holdout_fraction: float, seed: int, cache: Path, scratch: Path
) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    """(train, held out) items of the current preference set, its images in the local `cache`."""
    folder = fetch_folder(store, layout.preferences_prefix(current_preference_set(store, scratch)), cache)
    return load_preference_split(folder, holdout_fraction, seed)

"""A preference file turned into a self-contained, content-addressed preference set.

The user's file may point at images anywhere (relative paths, absolute paths, http URLs). Staging copies
every image into the set's own folder under a content-hash name and rewrites the file to point there, so
the set's version (the hash of the folder) changes exactly when the preferences or their images do, and
training reads only local files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

from ca_platform import layout
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.models.checkpoints import content_version
from ca_platform.preferences.files import read_preferences, resolve_images, write_preferences
from ca_platform.preferences.pairs import PreferenceItem, split_by_image

IMAGES_DIR = "images"


def stage_preferences(source: Path, folder: Path, policy: GuardPolicy) -> tuple[str, list[PreferenceItem]]:
    """Validate `source`, gather its images into `folder`; return the set's version and its items."""
    items = read_preferences(source)
    resolved = resolve_images(items, source.parent, folder / ".fetched", policy)
    images = folder / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    staged = []
    for item in resolved:
        path = Path(item.image)
        name = hashlib.sha1(path.read_bytes()).hexdigest()[:20] + path.suffix.lower()
        if not (images / name).exists():
            shutil.copyfile(path, images / name)
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

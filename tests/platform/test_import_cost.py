"""Loading the definitions imports no model or plotting stack: every Dagster process (code server, daemon, each
run worker, `dagster definitions validate`) loads them, and most never train, score, download or plot."""

from __future__ import annotations

import os
import subprocess
import sys

# Imported only where a model runs, a shard is downloaded, a tar is read or written, or a plot is drawn.
HEAVY = (
    "torch",
    "transformers",
    "safetensors",
    "sympy",
    "img2dataset",
    "albumentations",
    "wandb",
    "pandas",
    "webdataset",
    "matplotlib",
    "scipy",
)

PROBE = f"""
import sys
import ca_platform.definitions
print(",".join(name for name in {HEAVY!r} if name in sys.modules))
"""


def test_loading_the_definitions_imports_no_heavy_package() -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    imported = [name for name in probe.stdout.strip().split(",") if name]
    assert imported == [], f"importing ca_platform.definitions imported {imported}"

"""Turning `ca_platform.ingest.quality` outcomes into Dagster asset checks that live on the asset itself.

Blocking checks on the asset (not standalone check definitions, which would load every partition): a
failed one stops the downstream assets of that shard in the same run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from ca_platform.ingest.quality import CheckOutcome, CheckSpec


def blocking_check_specs(asset: str, specs: Sequence[CheckSpec]) -> list[AssetCheckSpec]:
    return [AssetCheckSpec(s.name, asset=asset, description=s.description, blocking=True) for s in specs]


def _metadata_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return MetadataValue.json(json.loads(json.dumps(value, default=str)))  # GX results hold numpy scalars
    return value


def check_results(outcomes: Sequence[CheckOutcome]) -> list[AssetCheckResult]:
    return [
        AssetCheckResult(
            check_name=o.name,
            passed=o.passed,
            severity=AssetCheckSeverity.ERROR,
            metadata={name: _metadata_value(value) for name, value in o.metadata.items()},
        )
        for o in outcomes
    ]

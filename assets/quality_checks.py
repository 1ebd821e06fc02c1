"""Turning `ca_platform.ingest.quality` outcomes into Dagster asset checks that live on the asset itself.

Blocking checks on the asset (not standalone check definitions, which would load every partition): a
failed one stops the downstream assets of that shard in the same run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, Failure, MetadataValue

from ca_platform.audit import AuditFailed
from ca_platform.ingest.quality import CheckOutcome, CheckSpec

T = TypeVar("T")


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


def audited(publish: Callable[[], T]) -> Generator[AssetCheckResult, None, T]:
    """Run a write-audit-publish step; when its audit fails, yield the failed checks' results (so the UI shows
    which check failed and why) and fail the run with the reason, naming where the rejected attempt is kept.
    Use as `result = yield from audited(lambda: ...)` in a generator asset."""
    try:
        return publish()
    except AuditFailed as failure:
        yield from check_results(failure.outcomes)
        raise Failure(str(failure), metadata={"rejected_attempt": MetadataValue.path(failure.rejected_uri)}) from None

"""Write, audit, publish: a per-shard output is staged aside, checked, and published only if it passes.

A failed audit leaves the published version in place (readers and downstream steps never see the bad
attempt) and keeps the attempt under `rejected/<step>/<shard>/<attempt>/` with an `audit.json` giving every
check's outcome, so the user can inspect what went wrong. Each transition is a named fault point
(`<step>:after-staging`, `<step>:after-audit`, `<step>:mid-publish`) for the crash-point tests.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ca_platform import layout
from ca_platform.ingest.quality import CheckOutcome
from ca_platform.storage import DataStore, fault_point, publish


class AuditFailed(RuntimeError):
    """A staged output failed its audit; nothing was published. `outcomes` holds every check's result."""

    def __init__(self, what: str, outcomes: Sequence[CheckOutcome], rejected_uri: str) -> None:
        self.outcomes = list(outcomes)
        self.rejected_uri = rejected_uri
        failed = [o for o in outcomes if not o.passed]
        reasons = "; ".join(f"{o.name}: {_reason(o)}" for o in failed)
        super().__init__(
            f"{what}: audit failed ({reasons}); the published version is unchanged; "
            f"this attempt is kept at {rejected_uri}"
        )


def _reason(outcome: CheckOutcome) -> str:
    """The outcome's own one-line summary when it gives one, else its failed expectations."""
    if "reason" in outcome.metadata:
        return str(outcome.metadata["reason"])
    metadata = outcome.metadata.items()
    failed = [name for name, result in metadata if isinstance(result, dict) and result.get("success") is False]
    return ", ".join(failed) or "failed"


@dataclass(frozen=True)
class StagedOutput:
    """One attempt's files: `files` (key -> local path) published first, then `index`, which readers trust."""

    step: str
    shard: str
    attempt: str  # the run id
    files: Mapping[str, Path]
    index_key: str
    index_file: Path


def audit_and_publish(store: DataStore, staged: StagedOutput, outcomes: Sequence[CheckOutcome]) -> None:
    """Publish `staged` if every outcome passed; otherwise keep it under rejected/ and raise AuditFailed."""
    fault_point(f"{staged.step}:after-staging")
    if not all(o.passed for o in outcomes):
        prefix = reject(store, staged, outcomes)
        raise AuditFailed(f"shard {staged.shard} ({staged.step})", outcomes, store.uri_of(prefix))
    fault_point(f"{staged.step}:after-audit")
    publish(store, dict(staged.files), staged.index_key, staged.index_file, fault_name=staged.step)


def reject(store: DataStore, staged: StagedOutput, outcomes: Sequence[CheckOutcome]) -> str:
    """Move the attempt under its rejected/ prefix, with audit.json; returns the prefix."""
    prefix = layout.rejected_prefix(staged.step, staged.shard, staged.attempt)
    for key, path in {**staged.files, staged.index_key: staged.index_file}.items():
        store.put_file(path, f"{prefix}/{key.rsplit('/', 1)[-1]}", consume=True)
    document = {
        "step": staged.step,
        "shard": staged.shard,
        "attempt": staged.attempt,
        "rejected_at": time.time(),
        "would_have_published": staged.index_key,
        "checks": [{"name": o.name, "passed": o.passed, "metadata": o.metadata} for o in outcomes],
    }
    with tempfile.TemporaryDirectory() as scratch:
        audit = Path(scratch) / "audit.json"
        audit.write_text(json.dumps(document, indent=2, default=str))
        store.put_file(audit, f"{prefix}/audit.json", consume=True)
    return prefix


def failed_shards_error(what: str, failures: Mapping[str, Exception], check_name: str) -> Exception:
    """One error naming every failed shard of a multi-shard step with its reason; an AuditFailed (carrying one
    merged outcome of `check_name`, for the run's asset check) when some failed their audit."""
    message = f"{what}: {len(failures)} shards failed: " + "; ".join(f"{s}: {e}" for s, e in failures.items())
    audits = {shard: error for shard, error in failures.items() if isinstance(error, AuditFailed)}
    if not audits:
        return RuntimeError(message)
    per_shard = {shard: error.outcomes[0].metadata for shard, error in audits.items()}
    merged = CheckOutcome(check_name, False, {"reason": f"failed for shards {', '.join(audits)}", **per_shard})
    return AuditFailed(message, [merged], ", ".join(error.rejected_uri for error in audits.values()))

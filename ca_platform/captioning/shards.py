"""Synthetic captions per shard, and the captioner that writes them.

The captioner is a user's local pretrained image-to-text folder, or by default the platform's own BLIP
captioner trained on the pool's downloaded pairs (BLIP's CapFilt bootstrapping: a captioner fitted to the
pool, its candidates then filtered by a scorer, here the reward model and CLIP score). Its *captioner
version* names the model and how it decodes, so captions of different models or decoding settings live side
by side, and a new version re-captions every shard as a new reward model rescores them.

torch and transformers are imported where a captioner is trained or loaded, not with the module: every
Dagster process loads the definitions, and most caption nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ca_platform import layout, schemas
from ca_platform.audit import StagedOutput, audit_and_publish, failed_shards_error
from ca_platform.ingest.download import fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.quality import CAPTION_CHECKS, CheckOutcome, check_synthetic_captions
from ca_platform.models.checkpoints import content_version
from ca_platform.scoring.registry import NoModelError, current_model, recipe_hash, train_once
from ca_platform.storage import DataStore, fetch_folder, fetch_to_local, write_json

if TYPE_CHECKING:
    from ca_platform.captioning.captioner import Captioner
    from ca_platform.captioning.decoding import DecodingSettings


@dataclass(frozen=True)
class CaptionerSettings:
    """Which captioner, how it decodes, and how the platform's own is trained (the `captioning` resource)."""

    pretrained_dir: str | None
    prompt: str | None  # for LLaVA-style models that caption after a text prompt
    strategy: str
    candidates: int
    max_new_tokens: int
    num_beams: int
    top_p: float
    top_k: int
    temperature: float
    decoding_seed: int
    source: str  # what the platform's own captioner starts from: "tiny" or a local BLIP folder
    image_size: int
    pool_epochs: float  # passes over the pool's downloaded pairs
    batch_size: int
    learning_rate: float
    seed: int
    device: str | None

    def decoding(self) -> DecodingSettings:
        from ca_platform.captioning.decoding import DecodingSettings

        return DecodingSettings(
            strategy=self.strategy,
            candidates=self.candidates,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            top_p=self.top_p,
            top_k=self.top_k,
            temperature=self.temperature,
            seed=self.decoding_seed,
        )

    def training(self) -> dict[str, Any]:
        """The settings that shape the platform's own captioner (not how it decodes, not the device)."""
        names = ("source", "image_size", "pool_epochs", "batch_size", "learning_rate", "seed")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class CurrentCaptioner:
    model_version: str  # the model's content hash
    version: str  # the captioner version: the model, its prompt and how it decodes
    document: dict[str, Any]  # the model's pointer document (models/captioner/current.json)


def captioner_version(model_version: str, settings: CaptionerSettings) -> str:
    """The model with its prompt and decoding settings: what the synthetic captions are a function of."""
    decoding = dataclasses.asdict(settings.decoding())
    return recipe_hash({"model": model_version, "prompt": settings.prompt, "decoding": decoding})


def train_or_adopt_captioner(
    store: DataStore, settings: CaptionerSettings, scratch: Path
) -> tuple[CurrentCaptioner, bool]:
    """Make the configured captioner current: the user's pretrained folder in place (by content hash), or the
    platform's BLIP captioner trained on the pool's downloaded pairs once per recipe (the pairs' fingerprint
    and the training settings). Returns it and whether a model was trained now."""
    if settings.pretrained_dir:
        document = {
            "version": content_version(Path(settings.pretrained_dir)),
            "pretrained_dir": settings.pretrained_dir,
        }
        write_json(store, layout.current_model_key(layout.CAPTIONER), document, scratch)
        return _current(document, settings), False
    from ca_platform.training.training_set import training_set

    pool = training_set(store, schemas.FULL, scratch / "pool")
    recipe = recipe_hash([pool.fingerprint, settings.training()])

    def train_and_save() -> tuple[str, Path, dict[str, Any]]:
        from ca_platform.training.captioner import save_trained_captioner, train_blip_captioner_on_tars
        from ca_platform.training.tars import TrainingBudget

        trained = train_blip_captioner_on_tars(
            pool.tars,
            TrainingBudget(samples_seen=max(2, round(settings.pool_epochs * pool.pairs))),
            pairs=pool.pairs,
            source=settings.source,
            image_size=settings.image_size,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            device=settings.device,
            description="captioner: training on the pool",
            excluded_uids=pool.excluded_uids,
        )
        version, folder = save_trained_captioner(trained, scratch / "checkpoints")
        return version, folder, {"training_pairs": pool.pairs, "metrics": trained.metrics}

    document, trained = train_once(store, layout.CAPTIONER, recipe, train_and_save, scratch)
    return _current(document, settings), trained


def _current(document: dict[str, Any], settings: CaptionerSettings) -> CurrentCaptioner:
    return CurrentCaptioner(document["version"], captioner_version(document["version"], settings), document)


def current_captioner(store: DataStore, settings: CaptionerSettings, scratch: Path) -> CurrentCaptioner:
    """The captioner made current by the captioner_model asset, with the configured decoding; NoModelError when
    there is none yet."""
    try:
        return _current(current_model(store, layout.CAPTIONER, scratch), settings)
    except NoModelError as error:
        raise NoModelError(f"{error}: materialize captioner_model first") from error


def load_current_captioner(
    store: DataStore, current: CurrentCaptioner, settings: CaptionerSettings, cache: Path
) -> Captioner:
    """The current captioner's model, loaded once per process, model version and device."""
    folder = current.document.get("pretrained_dir") or str(
        fetch_folder(store, layout.model_prefix(layout.CAPTIONER, current.model_version), cache)
    )
    return _cached_captioner(folder, current.model_version, settings.device, settings.prompt)


@functools.lru_cache(maxsize=2)
def _cached_captioner(folder: str, version: str, device: str | None, prompt: str | None) -> Captioner:
    """Keyed by the content version too, so a pretrained folder changed in place is loaded again."""
    from ca_platform.captioning.captioner import load_captioner

    return load_captioner(Path(folder), device=device, prompt=prompt)


@dataclass(frozen=True)
class ShardCaptions:
    shard: str
    captions: pl.DataFrame  # schemas.SYNTHETIC_CAPTIONS
    coverage: CheckOutcome
    reused: bool  # a file of this captioner version already covered the shard's downloads
    generated_tokens: int
    seconds: float


def read_synthetic_captions(store: DataStore, version: str, shard: str, scratch: Path) -> pl.DataFrame:
    """A shard's published candidate captions of one captioner version."""
    key = layout.synthetic_captions_key(version, shard)
    if not store.exists(key):
        raise LookupError(
            f"shard {shard} has no synthetic captions of captioner {version}: materialize "
            "synthetic_captions for it first"
        )
    return pl.read_parquet(fetch_to_local(store, key, scratch))


def caption_shard(
    store: DataStore,
    captioner: Captioner,
    settings: CaptionerSettings,
    version: str,
    shard: str,
    run_id: str,
    scratch: Path,
    batch_size: int,
    num_workers: int,
) -> ShardCaptions:
    """Write `settings.candidates` captions for every downloaded image of the shard, audit them against the
    ledger and publish them if they pass (AuditFailed otherwise, the attempt kept under rejected/); a file of
    this captioner version that already covers the shard's downloads is reused."""
    from ca_platform.captioning.streaming import caption_tars

    ledger = read_download_ledger(store, shard, scratch / "ledger")
    key = layout.synthetic_captions_key(version, shard)
    if store.exists(key):
        existing = pl.read_parquet(fetch_to_local(store, key, scratch / "existing"))
        outcome = check_synthetic_captions(existing, ledger, settings.candidates)[0]
        if outcome.passed:
            return ShardCaptions(shard, existing, outcome, reused=True, generated_tokens=0, seconds=0.0)
    tars = fetch_downloaded_tars(store, shard, ledger, scratch / "in")
    written = caption_tars(
        tars, captioner, settings.decoding(), batch_size=batch_size, num_workers=num_workers, description=shard
    )
    frame = written.frame.with_columns(
        pl.lit(shard).alias(schemas.SHARD), pl.lit(version).alias(schemas.CAPTIONER_VERSION)
    )
    frame = schemas.conform(frame, schemas.SYNTHETIC_CAPTIONS)
    local = scratch / "captions.parquet"
    frame.write_parquet(local)
    outcomes = check_synthetic_captions(frame, ledger, settings.candidates)
    audit_and_publish(store, StagedOutput(layout.CAPTION_STEP, shard, run_id, {}, key, local), outcomes)
    return ShardCaptions(shard, frame, outcomes[0], False, written.generated_tokens, written.seconds)


@dataclass(frozen=True)
class CaptioningRun:
    version: str  # the captioner version
    shards: list[ShardCaptions]

    def coverage(self) -> CheckOutcome:
        """One outcome for all the run's shards: passed when every shard's did."""
        outcomes = [s.coverage for s in self.shards]
        return CheckOutcome(
            CAPTION_CHECKS[0].name, all(o.passed for o in outcomes), {s.shard: s.coverage.metadata for s in self.shards}
        )


def caption_shards(
    store: DataStore,
    settings: CaptionerSettings,
    shards: Sequence[str],
    *,
    run_id: str,
    batch_size: int,
    num_workers: int,
    cache: Path,
    attempt: Callable[[str, str], AbstractContextManager[Path]],
    refresh: Callable[[list[str]], None],
) -> CaptioningRun:
    """Caption `shards` with the current captioner, loaded once for all of them.

    `attempt(step, shard)` holds the shard's lock and gives a private staging folder; `refresh(keys)` makes new
    caption files visible to the DuckDB views. A shard that fails does not stop the others: they are published,
    then one error names every failed shard. Raises NoModelError when there is no captioner yet.
    """
    with tempfile.TemporaryDirectory(prefix="ca-current-captioner-") as scratch:
        current = current_captioner(store, settings, Path(scratch))
    captioner = load_current_captioner(store, current, settings, cache)
    results: list[ShardCaptions] = []
    failures: dict[str, Exception] = {}
    for shard in shards:
        try:
            with attempt(layout.CAPTION_STEP, shard) as scratch:
                result = caption_shard(
                    store, captioner, settings, current.version, shard, run_id, scratch, batch_size, num_workers
                )
        except Exception as error:  # one bad shard never stops the others; `attempt` quarantined it
            failures[shard] = error
            continue
        if not result.reused:
            refresh([layout.synthetic_captions_key(current.version, shard)])
        results.append(result)
    if failures:
        raise failed_shards_error(f"captioner {current.version}", failures, CAPTION_CHECKS[0].name)
    return CaptioningRun(current.version, results)


def captioner_metadata(current: CurrentCaptioner, settings: CaptionerSettings) -> dict[str, Any]:
    """What the UI shows of a captioner: its versions, where it came from, how it decodes."""
    return {
        "captioner_version": current.version,
        "model_version": current.model_version,
        "source": current.document.get("pretrained_dir") or f"trained on the pool ({settings.source})",
        "decoding": dataclasses.asdict(settings.decoding()),
        "training": settings.training() if not settings.pretrained_dir else {},
    }

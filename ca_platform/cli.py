"""`ca-platform`: run the lineage, register shards, query analytics, configure the Dagster instance, run the demo."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca_platform.compression import DEFAULT_KEEP_FRACTION, DEMO_KEEP_FRACTIONS, parse_keep_fractions
from ca_platform.demo.shapes_pool import ShapesWorldConfig
from ca_platform.instance import (
    PG_URL_ENV,
    PG_URL_FORM,
    POSTGRES_MAX_CONCURRENT_RUNS,
    RAY_JOBS_ADDRESS_ENV,
    SQLITE_MAX_CONCURRENT_RUNS,
)

if TYPE_CHECKING:
    from ca_platform.engine import EngineSettings
    from ca_platform.resources import CaptioningConfig

DEMO_HOST = "127.0.0.1"


def _keep_fractions(text: str) -> tuple[float, ...]:
    """`--keep 0.1,0.3,0.5` (or one number): the compression curve, with the reason when it is not one."""
    try:
        return parse_keep_fractions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_s3(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint (default: boto3's, e.g. from AWS_ENDPOINT_URL); for s3:// URIs only",
    )


def _add_engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=["ray", "inline"],
        help="where shards run: 'ray' (default; concurrently, on a local Ray this command starts or on the cluster "
        "at --ray-address) or 'inline' (one after another in this process); default from CA_ENGINE",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="an existing Ray cluster (e.g. 10.0.0.5:6379 or ray://head:10001); default CA_RAY_ADDRESS / RAY_ADDRESS, "
        "else an embedded local Ray",
    )


def _add_progress(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--quiet", action="store_true", help="print only the report: no stage lines, no progress (errors still show)"
    )
    shown.add_argument(
        "--verbose", action="store_true", help="also print Dagster's own log of every run (steps, checks, events)"
    )


def _show_progress(args: argparse.Namespace) -> str:
    """Progress on the terminal as asked (a live bar on a terminal, plain lines otherwise); the Dagster log level
    of the runs."""
    from ca_platform import progress

    progress.show_in_terminal("quiet" if args.quiet else None)
    return "INFO" if args.verbose else "WARNING"


def _engine(args: argparse.Namespace) -> EngineSettings:
    from ca_platform.engine import EngineSettings

    return EngineSettings.from_env(kind=args.engine, address=args.ray_address)


def _cmd_run(args: argparse.Namespace) -> int:
    from ca_platform import runner
    from ca_platform.evaluation.classification import TemplateError
    from ca_platform.evaluation.classification_set import ClassificationSetError
    from ca_platform.preferences.files import PreferenceFormatError
    from ca_platform.resources import ModelTrainingConfig, build_resources

    if (args.eval_classes or args.eval_template) and not args.eval:
        print("error: --eval-classes and --eval-template need --eval (models train only with it)", file=sys.stderr)
        return 2
    resources = build_resources(
        args.pool,
        args.data,
        args.allow_host,
        args.s3_endpoint_url,
        preferences_uri=args.preferences,
        preference_image_root=args.preference_image_root,
        keep_fraction=args.keep,
        evaluation_uri=args.eval,
        classes_uri=args.eval_classes,
        class_templates=args.eval_template,
        model_training=ModelTrainingConfig(seeds=args.seeds),
        captioning=_captioning(args),
    )
    try:
        run = runner.run_lineage(
            resources,
            log_level=_show_progress(args),
            compress=args.keep is not None or args.eval is not None or args.recaption,
            force=args.force,
            engine=_engine(args),
        )
    except (PreferenceFormatError, ClassificationSetError, TemplateError) as err:  # raised before anything ran
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(runner.report(run))
    return 0 if run.success else 1


def _add_recaption(parser: argparse.ArgumentParser, default: bool) -> None:
    parser.add_argument(
        "--recaption",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="write synthetic captions for every downloaded image (--captioner, else the platform's own BLIP "
        "captioner trained on the pool), score them, and add the caption variants recap_all, raw_topk_plus_recap, "
        "recap_mix_p and reward_best_caption to the cut and the curation report",
    )
    parser.add_argument(
        "--captioner", metavar="DIR", help="a local pretrained image-to-text folder (BLIP, BLIP-2, LLaVA-style)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train N models per variant (seeds 0..N-1): the curation report gives each figure's mean and spread",
    )


def _captioning(args: argparse.Namespace, **settings: Any) -> CaptioningConfig:
    from ca_platform.resources import CaptioningConfig

    return CaptioningConfig(enabled=args.recaption, pretrained_dir=args.captioner, **settings)


def _cmd_shards(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from ca_platform import runner
    from ca_platform.ingest.pool import ShardKeyCollisionError, survey_pool
    from ca_platform.resources import s3_resource
    from ca_platform.storage import open_store

    s3 = s3_resource(args.s3_endpoint_url)
    pool = open_store(args.pool, s3.get_client)
    if args.action == "list":
        try:
            survey = survey_pool(pool)
        except ShardKeyCollisionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for shard in survey.shards:
            print(f"{shard.key}\t{pool.uri_of(shard.object_key)}")
        for ignored in survey.ignored:
            print(f"ignored: {pool.uri_of(ignored.object_key)}: {ignored.reason}", file=sys.stderr)
        return 0
    keys = [shard.key for shard in runner.register_shards(pool, DagsterInstance.get())]
    print(f"{len(keys)} shard partitions registered: {', '.join(keys)}")
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from ca_platform import analytics
    from ca_platform.resources import PlatformStorage, s3_resource

    s3 = s3_resource(args.s3_endpoint_url)
    storage = PlatformStorage(pool_uri="", data_uri=args.data, s3=s3, analytics_dir=args.analytics_dir)
    if args.data.startswith("s3://"):
        analytics.mirror(storage.data_store(), storage.analytics_root())
    analytics.ensure_views(storage.analytics_db(), storage.analytics_root())
    if args.list or args.query is None:
        from ca_platform.analytics.queries import describe_macros

        views = ", ".join([*analytics.database.VIEW_SCHEMAS, *analytics.database.DERIVED_VIEWS])
        print(f"views: {views}; ready-made queries (SELECT * FROM <macro>(...)):")
        for _, signature, description in describe_macros():
            print(f"\n  {signature}\n    {description}")
        return 0
    import duckdb

    try:
        result = analytics.query(storage.analytics_db(), args.query)
    except duckdb.Error as err:  # a SQL mistake or a refused write (the database is opened read-only)
        print(f"error: {_first_paragraph(str(err))}", file=sys.stderr)
        return 1
    print(result.as_text())
    return 0


def _first_paragraph(message: str) -> str:
    """DuckDB's message up to its blank line, on one line: the error and its hint, without the caret drawing."""
    return " ".join(line.strip() for line in message.strip().split("\n\n", 1)[0].splitlines())


def _cmd_register(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from ca_platform import runner
    from ca_platform.resources import build_resources, s3_resource
    from ca_platform.scoring.registry import register_reward_checkpoint, unpin_reward_checkpoint
    from ca_platform.storage import open_store

    s3 = s3_resource(args.s3_endpoint_url)
    store = open_store(args.data, s3.get_client)
    if args.unpin:
        done = unpin_reward_checkpoint(store)
        print("unpinned: reward_model trains from the preferences again" if done else "nothing was pinned")
    elif args.folder is None:
        raise SystemExit("register-reward-model: give a checkpoint folder, or --unpin")
    else:
        with tempfile.TemporaryDirectory(prefix="ca-register-") as scratch:
            version = register_reward_checkpoint(store, Path(args.folder), Path(scratch))
        print(
            f"pinned reward model version {version}: reward_model adopts it on its next run, then every shard is "
            "rescored (automatically when the automation sensor runs)"
        )
    if os.environ.get("DAGSTER_HOME"):
        resources = build_resources("", args.data, s3_endpoint_url=args.s3_endpoint_url)
        observed = runner.observe_registrations(resources)
        if not observed.success:
            print(f"could not record the registration on the Dagster instance: {observed.error}", file=sys.stderr)
            return 1
    return 0


def _cmd_instance(args: argparse.Namespace) -> int:
    import os

    from ca_platform.instance import InstanceConfigError, write_instance_config

    home = args.dagster_home or os.environ.get("DAGSTER_HOME")
    if not home:
        print("error: give --dagster-home or set DAGSTER_HOME", file=sys.stderr)
        return 1
    pg_url = os.environ.get(PG_URL_ENV) or None
    ray_jobs = os.environ.get(RAY_JOBS_ADDRESS_ENV) or None
    try:
        path = write_instance_config(Path(home), pg_url, args.max_concurrent_runs, ray_jobs)
    except InstanceConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    storage = f"PostgreSQL storage, its URL read from ${PG_URL_ENV} by every Dagster process" if pg_url else "SQLite"
    launcher = f"; runs launched as Ray jobs on {ray_jobs}" if ray_jobs else ""
    print(f"wrote {path}: {storage}{launcher}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ca_platform import runner
    from ca_platform.demo.annotators import ShapesPreferenceConfig, preference_scene_keys, write_shapes_preferences
    from ca_platform.demo.classification_set import DEMO_CLASS_TEMPLATES, write_shapes_classification_set
    from ca_platform.demo.evaluation_set import pool_images_to_leak, write_shapes_evaluation_set
    from ca_platform.demo.image_server import ImageServer
    from ca_platform.demo.shapes_pool import generate_pool, pool_scene_keys
    from ca_platform.demo.truth_audit import write_truth_audit
    from ca_platform.resources import CompressionConfig, ModelTrainingConfig, build_resources

    log_level = _show_progress(args)
    root = Path(args.dir).resolve()
    world_dir = root / "world"
    world_dir.mkdir(parents=True, exist_ok=True)
    config = ShapesWorldConfig(
        seed=args.seed, shards=args.shards, rows_per_shard=args.rows, duplicate_fraction=args.duplicates
    )
    with ImageServer(world_dir, host=DEMO_HOST, port=args.port) as server:
        world = generate_pool(world_dir, server.base_url, config)
        print(
            f"shapes world: {world.rows} rows in {len(world.shard_paths)} shards, served at {server.base_url} "
            f"({args.duplicates:.0%} of the rows copy another row's image: exact, re-encoded or resized)"
        )
        if args.serve:
            print(f"pool: {world.pool_dir}  (Ctrl-C to stop serving)", flush=True)
            server.wait()
            return 0
        preference_config = ShapesPreferenceConfig(images=args.preference_images, avoid_pool=config)
        preferences = write_shapes_preferences(root / "preferences", preference_config)
        print(f"preferences: {preferences} (images disjoint from the pool)")
        leaked = pool_images_to_leak(world, args.leaked_eval_images)
        evaluation = write_shapes_evaluation_set(
            world_dir, server.base_url, images=args.eval_images, seed=args.seed, avoid_pool=config, leaked=leaked
        )
        print(
            f"evaluation set: {evaluation} ({args.eval_images} held-out images, 2 references each, and "
            f"{len(leaked)} copies of pool images, which decontamination removes from the pool)"
        )
        classes = None
        if args.class_images:
            avoid = pool_scene_keys(config) | preference_scene_keys(preference_config)
            classes = write_shapes_classification_set(
                world_dir, server.base_url, images=args.class_images, seed=args.seed, avoid=avoid
            )
            print(
                f"labelled set: {classes} ({args.class_images} images, the class the colour and shape of the largest "
                "object: zero-shot classification of every variant's CLIP)"
            )
        resources = build_resources(
            str(world.pool_dir),
            str(root / "data"),
            [DEMO_HOST],
            download_options={"thread_count": 16},
            preferences_uri=str(preferences),
            keep_fraction=args.keep,
            evaluation_uri=str(evaluation),
            classes_uri=str(classes) if classes else None,
            class_templates=DEMO_CLASS_TEMPLATES,
            model_training=ModelTrainingConfig(full_epochs=args.full_epochs, seeds=args.seeds),
            captioning=_captioning(args, pool_epochs=args.full_epochs),
            # the shapes world draws flat colours on flat grounds: too little low-frequency content for a pHash,
            # whose hashes then collide across distinct scenes (even at 0 bits); the demo matches exact pixels only
            compression=CompressionConfig(near_duplicate_bits=None),
        )
        run = runner.run_lineage(resources, log_level=log_level, compress=True, engine=_engine(args))
    print(runner.report(run))
    if run.success:
        storage = resources["storage"]
        with storage.staging_dir("demo-truth") as scratch:
            audit = write_truth_audit(storage.data_store(), storage.analytics_db(), world.truth_dir, scratch)
        print("\n" + "\n".join(audit.lines()))
    return 0 if run.success else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca-platform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the lineage for every shard of a pool, in-process")
    run.add_argument(
        "--pool", required=True, help="folder or s3://bucket/prefix of parquet shards (url, caption[, uid])"
    )
    run.add_argument("--data", required=True, help="folder or s3://bucket/prefix for the platform's outputs")
    run.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="let downloads reach this otherwise refused (private/loopback) host; repeatable",
    )
    run.add_argument(
        "--preferences",
        metavar="FILE",
        help="human preference rankings (JSONL/parquet): train the reward model and score every shard; checked "
        "whole (format and every image) before anything is downloaded",
    )
    run.add_argument(
        "--preference-image-root",
        metavar="DIR",
        help="folder the preference file's local images must lie under (default: the file's own folder)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="download every shard again, even those already downloaded from the same pool file (a re-download "
        "is still audited: it replaces the published one only if it is not clearly worse)",
    )
    run.add_argument(
        "--keep",
        type=_keep_fractions,
        metavar="K[,K...]",
        help=f"keep this fraction of the scored pool (e.g. {DEFAULT_KEEP_FRACTION}), or each of several for the "
        "compression curve (e.g. 0.1,0.2,0.3,0.5): the cut and subsets of every variant at every k, and with "
        "--eval models trained on each",
    )
    run.add_argument(
        "--eval",
        metavar="FILE",
        help=f"held-out evaluation set (parquet url, caption): after the subsets (at --keep, default "
        f"{DEFAULT_KEEP_FRACTION}), train CLIP and BLIP on every variant, evaluate them and write "
        "reports/curation_report.json",
    )
    run.add_argument(
        "--eval-classes",
        metavar="FILE",
        help="labelled set for zero-shot classification (parquet url, label, and optionally name: a readable class "
        "name per label); with --eval, every variant's CLIP is also scored on top-1/top-5 accuracy in the report",
    )
    run.add_argument(
        "--eval-template",
        action="append",
        metavar="TEMPLATE",
        help="a prompt template for --eval-classes, '{}' standing for the class name (e.g. 'a photo of a {}.'); "
        "repeatable, each class's text embedding is the mean over them (default: a handful of CLIP's)",
    )
    _add_recaption(run, default=False)
    _add_s3(run)
    _add_engine(run)
    _add_progress(run)
    run.set_defaults(func=_cmd_run)

    shards = sub.add_parser("shards", help="list a pool's shards or register them as partitions (DAGSTER_HOME)")
    shards.add_argument("action", choices=["register", "list"])
    shards.add_argument("--pool", required=True)
    _add_s3(shards)
    shards.set_defaults(func=_cmd_shards)

    sql = sub.add_parser("sql", help="query the DuckDB analytics views and ready-made macros (--list shows them)")
    sql.add_argument("query", nargs="?", help="SQL, e.g. \"SELECT * FROM score_quantiles('reward_model')\"")
    sql.add_argument("--list", action="store_true", help="list the views and the ready-made query macros")
    sql.add_argument("--data", required=True, help="the data root the runs wrote to")
    sql.add_argument("--analytics-dir", help="local folder for the database of an S3 data root")
    _add_s3(sql)
    sql.set_defaults(func=_cmd_sql)

    register = sub.add_parser("register-reward-model", help="pin a reward-model checkpoint trained elsewhere")
    register.add_argument(
        "folder", nargs="?", help="checkpoint folder (model.safetensors, config.json, tokenizer, ...)"
    )
    register.add_argument("--unpin", action="store_true", help="train reward_model from the preferences again")
    register.add_argument("--data", required=True, help="the data root whose models it joins")
    _add_s3(register)
    register.set_defaults(func=_cmd_register)

    instance = sub.add_parser("instance", help="write the Dagster instance's dagster.yaml (SQLite or PostgreSQL)")
    instance.add_argument("action", choices=["init"])
    instance.add_argument(
        "--dagster-home", metavar="DIR", help="the instance's folder (default: $DAGSTER_HOME); created if missing"
    )
    instance.add_argument(
        "--max-concurrent-runs",
        type=int,
        metavar="N",
        help=f"runs the daemon lets go at once (default: {POSTGRES_MAX_CONCURRENT_RUNS} on PostgreSQL, "
        f"{SQLITE_MAX_CONCURRENT_RUNS} on SQLite)",
    )
    instance.epilog = (
        f"Storage is PostgreSQL when {PG_URL_ENV}={PG_URL_FORM} is set (the file refers to the variable, so the "
        f"password is never written), SQLite under the folder otherwise. With {RAY_JOBS_ADDRESS_ENV}=http://head:8265 "
        "(a Ray cluster's job server; needs PostgreSQL) dagster-ray's RayRunLauncher runs every run as a Ray job."
    )
    instance.set_defaults(func=_cmd_instance)

    demo = sub.add_parser("demo", help="generate the shapes world, serve it on 127.0.0.1 and run the lineage")
    demo.add_argument("--dir", default=".demo", help="where the world and the data root go (default .demo)")
    demo.add_argument("--shards", type=int, default=ShapesWorldConfig.shards)
    demo.add_argument("--rows", type=int, default=ShapesWorldConfig.rows_per_shard, help="rows per shard")
    demo.add_argument("--seed", type=int, default=ShapesWorldConfig.seed)
    demo.add_argument(
        "--keep",
        type=_keep_fractions,
        default=",".join(map(str, DEMO_KEEP_FRACTIONS)),
        metavar="K[,K...]",
        help="fractions of the pool to keep: the compression curve's points (default: %(default)s)",
    )
    demo.add_argument("--preference-images", type=int, default=2000, help="images with ranked captions")
    demo.add_argument("--eval-images", type=int, default=300, help="held-out evaluation images")
    demo.add_argument(
        "--class-images",
        type=int,
        default=300,
        metavar="N",
        help="labelled images for zero-shot classification (class: colour and shape of the largest object); 0: none",
    )
    demo.add_argument(
        "--duplicates",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="share of pool rows whose image copies another row's (exact, JPEG re-encode, larger rendering)",
    )
    demo.add_argument(
        "--leaked-eval-images",
        type=int,
        default=10,
        metavar="N",
        help="pool images the evaluation set holds too (exact and re-encoded), for decontamination to remove",
    )
    demo.add_argument(
        "--full-epochs",
        type=float,
        default=3.0,
        help="training budget of every variant's CLIP and BLIP (and of the captioner): samples seen = this many "
        "passes over the full pool",
    )
    demo.add_argument("--port", type=int, default=0, help="image server port (default: any free one)")
    demo.add_argument("--serve", action="store_true", help="only generate and serve the pool until Ctrl-C")
    _add_recaption(demo, default=True)
    _add_engine(demo)
    _add_progress(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # lines in order, when piped too
    from dagster import BetaWarning

    warnings.filterwarnings("ignore", category=BetaWarning)  # backfill_policy is beta; a report is no place for it
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-checkpoint bars would drown the report
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The lineage on a real two-node Ray cluster on this machine (a head and a second node, one CPU each): shards
run on both nodes, a scorer killed mid-scoring is retried by Ray and leaves exactly one result."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from ca_platform import analytics, layout
from ca_platform.engine import EngineSettings, Work, WorkerLost, connect, open_engine
from ca_platform.runner import build_resources, report, run_lineage
from ca_platform.schemas import REWARD_MODEL
from ca_platform.storage import FAULT_ENV, FAULT_ONCE_ENV
from tests.conftest import fast_reward_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[EngineSettings]:
    """Two Ray nodes of one CPU each, this process connected as the driver (once: Ray is process-wide)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    settings = EngineSettings(kind="ray", address=cluster.address)
    connect(settings)
    yield settings
    ray.shutdown()
    cluster.shutdown()


def _nodes_of(instance: DagsterInstance, asset: str, shards: list[str]) -> dict[str, str]:
    nodes = {}
    for shard in shards:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[shard]), limit=1
        ).records
        assert records, f"{asset} {shard} has no materialization"
        nodes[shard] = records[0].asset_materialization.metadata["ray_node"].value
    return nodes


def test_the_lineage_runs_on_both_nodes_and_a_scorer_killed_mid_scoring_leaves_exactly_one_result(
    ray_cluster: EngineSettings, web_pool: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    pool = web_pool(rows_per_shard=8)  # two shards: one cluster of two one-CPU nodes runs them side by side
    data = tmp_path / "data"
    resources = build_resources(
        str(pool), str(data), ["127.0.0.1"], **fast_reward_stage(tmp_path / "prefs"), keep_fraction=0.5
    )
    killed = tmp_path / "killed-once"
    # The first scorer to stage its scores (computed, not yet audited or published) dies at once, as a worker
    # lost to the OOM killer or a pre-empted node would; the variables reach the workers with the shard's task.
    monkeypatch.setenv(FAULT_ENV, f"{layout.scores_step(REWARD_MODEL)}:after-staging")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(killed))
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        run = run_lineage(resources, instance, compress=True, engine=ray_cluster)
        assert run.success, report(run)
        shards = ["part-00000", "part-00001"]
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for asset in ("downloaded_shard", "reward_scores", "compressed_subset"):
            placed = _nodes_of(instance, asset, shards)
            assert set(placed.values()) == cluster_nodes, (asset, placed)  # every shard on a node, both nodes used
    assert killed.exists()  # a scorer did die mid-scoring; Ray restarted it and ran the shard again
    text = report(run)
    assert f"Ray cluster at {ray_cluster.address}: 2 node(s), 2 CPUs" in text
    assert "runs by node (per shard and per variant):" in text

    db = data / layout.ANALYTICS_DB
    per_shard = analytics.query(
        db,
        "SELECT d.shard, count(DISTINCT d.uid) AS downloaded, count(s.uid) AS scored, count(DISTINCT s.uid) AS uids "
        "FROM downloads d LEFT JOIN scores s ON s.shard = d.shard AND s.uid = d.uid AND s.scorer = ? "
        "WHERE d.status = 'success' GROUP BY d.shard ORDER BY d.shard",
        [REWARD_MODEL],
    ).rows
    assert [row[0] for row in per_shard] == shards
    for shard, downloaded, scored, uids in per_shard:
        assert downloaded == scored == uids, shard  # none missing, none twice
    for shard in shards:
        versions = list((data / layout.SCORES_DIR / REWARD_MODEL).glob(f"*/{shard}.parquet"))
        assert len(versions) == 1, versions  # one published file per shard and version
    assert not any((data / layout.LOCKS_DIR / "shards").glob("*.json"))  # the dead worker's lock was broken
    kept = analytics.query(db, "SELECT count(*) FILTER (kept), count(*) FROM subsets WHERE variant = 'reward_topk'")
    assert kept.rows[0][1] == sum(row[1] for row in per_shard) and kept.rows[0][0] == round(0.5 * kept.rows[0][1])


@pytest.mark.parametrize("work", ["task", "scorer"])
def test_a_shard_whose_worker_dies_every_time_fails_alone(ray_cluster: EngineSettings, work: Work) -> None:
    """Past Ray's retries the engine reports the lost shard and finishes the others (the runner then
    quarantines it): one shard that kills every worker it lands on never stops a pool."""

    def die_on_b(shard: str) -> str:
        if shard == "b":
            os._exit(1)
        return shard.upper()

    engine = open_engine(replace(ray_cluster, max_retries=1))
    results = dict(engine.map_shards(die_on_b, ["a", "b", "c", "d"], work))
    assert {k: v for k, v in results.items() if k != "b"} == {"a": "A", "c": "C", "d": "D"}
    assert isinstance(results["b"], WorkerLost) and "retries were spent" in str(results["b"])

"""Where per-shard work runs: on Ray (an embedded local Ray by default, or a cluster by address), or inline.

`ca-platform run` hands each shard's stage (one Dagster run of one partition) to the engine. On Ray a shard is
a task with declared CPUs, placed by Ray on any node with room and retried by Ray when its worker dies;
scoring goes to a pool of scorer actors (GPUs per actor configurable) that keep their models loaded across
the many shards they take. Retrying is safe because every per-shard write is write-aside-then-publish under
the shard's lock: a retried shard leaves exactly one result. The inline engine runs shards one after another
in this process (for debugging and the tests that are not about scale-out).

Ray is imported lazily: Dagster processes that only load definitions never pay for it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ca_platform import progress

if TYPE_CHECKING:
    from ray.actor import ActorHandle

ENGINE_ENV = "CA_ENGINE"  # "ray" (default) or "inline"
ADDRESS_ENVS = ("CA_RAY_ADDRESS", "RAY_ADDRESS")
# Variables a shard's worker needs from the process that submits it: where the Dagster instance lives, the
# platform's settings, and S3 credentials; a cluster's workers do not otherwise share the driver's environment.
FORWARDED_ENV_PREFIXES = ("CA_", "DAGSTER_", "AWS_")

T = TypeVar("T")
# How a partition's run is placed: a task (downloads, subsets), a call on a scorer actor that keeps its models
# loaded (scoring, captioning), or a task that trains models and takes a scorer's GPU share.
Work = Literal["task", "scorer", "trainer"]


class WorkerLost(RuntimeError):
    """A shard's worker (or scorer actor) died more often than the engine's retries allow."""


@dataclass(frozen=True)
class EngineSettings:
    kind: Literal["ray", "inline"] = "ray"
    address: str | None = None  # a Ray cluster's address; None starts an embedded local Ray
    cpus_per_shard: float = 1.0  # CPUs a shard's task (and each scorer actor) reserves
    scorer_actors: int | None = None  # None: one per CPU the cluster has for shards
    gpus_per_scorer: float = 0.0  # per scorer actor and trainer task: 0 on CPU machines; e.g. 1 (or 0.5) on GPU nodes
    max_retries: int = 3  # Ray's retries of a shard whose worker died
    local_cpus: int | None = None  # CPUs of the embedded local Ray (None: all of this machine's)

    @classmethod
    def from_env(cls, **overrides: Any) -> EngineSettings:
        """CA_ENGINE (ray | inline), CA_RAY_ADDRESS / RAY_ADDRESS, and CA_RAY_<FIELD> for the numeric fields
        (e.g. CA_RAY_GPUS_PER_SCORER=1); explicit `overrides` (not None) win."""
        address = next((os.environ[name] for name in ADDRESS_ENVS if os.environ.get(name)), None)
        values: dict[str, Any] = {"kind": os.environ.get(ENGINE_ENV, "ray") or "ray", "address": address}
        for name, parse in _NUMERIC_FIELDS.items():
            raw = os.environ.get(f"CA_RAY_{name.upper()}", "").strip()
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError:
                    raise ValueError(f"CA_RAY_{name.upper()}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["kind"] not in ("ray", "inline"):
            raise ValueError(f"{ENGINE_ENV}={values['kind']!r}: expected 'ray' or 'inline'")
        return cls(**values)


_NUMERIC_FIELDS: dict[str, Callable[[str], Any]] = {
    "cpus_per_shard": float,
    "scorer_actors": int,
    "gpus_per_scorer": float,
    "max_retries": int,
    "local_cpus": int,
}


@dataclass(frozen=True)
class Placement:
    """Where a piece of work ran: the host, and the Ray node id when it ran on Ray."""

    host: str
    ray_node: str | None

    def describe(self) -> str:
        return f"{self.host} (Ray node {self.ray_node[:12]})" if self.ray_node else self.host

    def as_metadata(self) -> dict[str, str]:
        """For a per-shard asset's metadata: which machine and Ray node produced this partition."""
        return {"host": self.host, "ray_node": self.ray_node or "(not on Ray)"}


def current_placement() -> Placement:
    """The host and Ray node of the calling process (no Ray node outside a Ray worker or driver)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return Placement(socket.gethostname(), node)


class Engine:
    """Runs `fn(shard)` for many shards and yields (shard, result) as they finish; a shard whose worker was lost
    for good yields a WorkerLost in place of its result, and the others go on."""

    def describe(self) -> str:
        raise NotImplementedError

    def start_scorers(self, shards: int, prepare: Callable[[str], object]) -> None:
        """Start the scorer workers a scoring stage of `shards` shards will use, each running `prepare` (its
        imports, seconds), so that their start-up overlaps what runs before scoring (the reward model's
        training) instead of adding to it. Nothing to start where scoring runs in this process."""

    def map_shards(
        self, fn: Callable[[str], T], shards: Sequence[str], work: Work = "task", label: str = "shards"
    ) -> Iterator[tuple[str, T | WorkerLost]]:
        """`label` names the work in the progress lines shown while it runs."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of whatever was started and not used (scorers of a stage that never came); called once the
        per-shard stages are over."""


class InlineEngine(Engine):
    def describe(self) -> str:
        return f"inline, one shard at a time in this process on {socket.gethostname()}"

    def map_shards(
        self, fn: Callable[[str], T], shards: Sequence[str], work: Work = "task", label: str = "shards"
    ) -> Iterator[tuple[str, T | WorkerLost]]:
        for shard in shards:
            yield shard, fn(shard)


class RayEngine(Engine):
    """Shards as Ray tasks (or calls on scorer actors), at most a few per CPU in flight so that a pool of
    10^5 shards does not put 10^5 pending tasks into Ray at once."""

    IN_FLIGHT_PER_SLOT = 2

    def __init__(self, settings: EngineSettings) -> None:
        import ray

        self.settings = settings
        self.embedded = connect(settings)
        self._scorers: list[ActorHandle] = []  # started ahead of a scoring stage, which then uses them
        # where workers post their progress lines, for the driver to show while it waits (no CPU of its own)
        self._board_name = f"ca-progress-{uuid.uuid4().hex[:12]}"
        self._board = ray.remote(progress.ProgressBoard).options(name=self._board_name, num_cpus=0).remote()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = ray.cluster_resources().get("CPU", 0)
        gpus = ray.cluster_resources().get("GPU", 0)
        if self.embedded:
            where = f"embedded local Ray at {ray.get_runtime_context().gcs_address}"
        else:
            where = f"Ray cluster at {settings.address or ray.get_runtime_context().gcs_address}"
        self._description = f"{where}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"

    def describe(self) -> str:
        return self._description

    def slots(self) -> int:
        """How many shards the cluster runs at once with its present CPUs."""
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.settings.cpus_per_shard, 0.01)))

    def map_shards(
        self, fn: Callable[[str], T], shards: Sequence[str], work: Work = "task", label: str = "shards"
    ) -> Iterator[tuple[str, T | WorkerLost]]:
        if not shards:
            return
        waiting = _Waiting(label, len(shards), self._board)
        if work == "scorer":
            yield from self._on_scorers(fn, shards, waiting)
        else:
            gpus = self.settings.gpus_per_scorer if work == "trainer" else 0.0
            yield from self._as_tasks(fn, shards, gpus, waiting)

    def _options(self) -> dict[str, Any]:
        return {"runtime_env": {"env_vars": {**forwarded_env(), progress.BOARD_ENV: self._board_name}}}

    def _as_tasks(
        self, fn: Callable[[str], T], shards: Sequence[str], gpus: float, waiting: _Waiting
    ) -> Iterator[tuple[str, T | WorkerLost]]:
        import ray

        task = ray.remote(_call).options(
            num_cpus=self.settings.cpus_per_shard,
            num_gpus=gpus,
            max_retries=self.settings.max_retries,
            **self._options(),
        )
        work = ray.put(fn)  # stored once, not pickled again with each of the shards
        pending = deque(shards)
        running: dict[Any, str] = {}
        window = self.slots() * self.IN_FLIGHT_PER_SLOT
        while pending or running:
            while pending and len(running) < window:
                shard = pending.popleft()
                running[task.remote(work, shard)] = shard
            ref = waiting.next_done(running)
            shard = running.pop(ref)
            yield shard, _result(ref, shard)

    def _on_scorers(
        self, fn: Callable[[str], T], shards: Sequence[str], waiting: _Waiting
    ) -> Iterator[tuple[str, T | WorkerLost]]:
        """Each actor takes the next shard as soon as it is free; an actor lost for good (its restarts spent) is
        replaced; the actors are gone when the stage is."""
        import ray

        actors = self._scorers or [self._scorer_actor() for _ in range(self._scorer_count(len(shards)))]
        self._scorers = []
        work = ray.put(fn)
        try:
            pending = deque(shards)
            running: dict[Any, tuple[str, ActorHandle]] = {}
            for actor in actors:
                if pending:
                    shard = pending.popleft()
                    running[actor.call.remote(work, shard)] = (shard, actor)
            while running:
                ref = waiting.next_done(running)
                shard, actor = running.pop(ref)
                result = _result(ref, shard)
                if isinstance(result, WorkerLost):
                    actors.remove(actor)
                    actor = self._scorer_actor()
                    actors.append(actor)
                if pending:
                    following = pending.popleft()
                    running[actor.call.remote(work, following)] = (following, actor)
                yield shard, result
        finally:
            for actor in actors:
                ray.kill(actor)

    def start_scorers(self, shards: int, prepare: Callable[[str], object]) -> None:
        if shards and not self._scorers:
            self._scorers = [self._scorer_actor() for _ in range(self._scorer_count(shards))]
            for actor in self._scorers:
                actor.call.remote(prepare, "(start)")  # queued first: the stage's calls wait behind it

    def close(self) -> None:
        """Also stops an embedded Ray: its idle workers hold memory and a share of the cores that what follows
        in this process (training, evaluation) wants."""
        import ray

        if not ray.is_initialized():
            return
        for actor in [*self._scorers, self._board]:
            ray.kill(actor)
        self._scorers = []
        if self.embedded:
            ray.shutdown()
            _started_here.clear()

    def _scorer_count(self, shards: int) -> int:
        return max(1, min(shards, self.settings.scorer_actors or self.slots()))

    def _scorer_actor(self) -> ActorHandle:
        import ray

        return (
            ray.remote(ShardWorker)
            .options(
                num_cpus=self.settings.cpus_per_shard,
                num_gpus=self.settings.gpus_per_scorer,
                max_restarts=self.settings.max_retries,
                max_task_retries=self.settings.max_retries,
                scheduling_strategy="SPREAD",
                **self._options(),
            )
            .remote()
        )


class ShardWorker:
    """A Ray actor's state: one process that takes shard after shard, so what it loads once (a scorer's model,
    in ca_platform.scoring.registry's cache) serves all of them."""

    def call(self, fn: Callable[[str], T], shard: str) -> T:
        progress.post_to_board()
        return fn(shard)


def _call(fn: Callable[[str], T], shard: str) -> T:
    progress.post_to_board()
    return fn(shard)


HEARTBEAT_S = 15.0  # how often the driver says what runs while nothing finishes


class _Waiting:
    """The driver's wait for the next finished piece of work of a stage: every HEARTBEAT_S without one, it says
    what is still running and the workers' latest progress lines, so a long stage is visibly alive."""

    def __init__(self, label: str, total: int, board: ActorHandle) -> None:
        self.label, self.total, self.board = label, total, board
        self.finished = 0
        self.started = time.monotonic()
        self.seen = self._lines(0)[0]  # what earlier stages posted is theirs

    def next_done(self, running: dict[Any, Any]) -> Any:
        """The reference of the next piece of `running` (references to shard or (shard, actor)) to finish."""
        import ray

        while True:
            done, _ = ray.wait(list(running), num_returns=1, timeout=HEARTBEAT_S)
            if done:
                self.finished += 1
                return done[0]
            self._heartbeat([entry if isinstance(entry, str) else entry[0] for entry in running.values()])

    def _heartbeat(self, running: list[str]) -> None:
        shown = ", ".join(running[:4]) + (", ..." if len(running) > 4 else "")
        elapsed = time.monotonic() - self.started
        progress.say(f"{self.label}: {self.finished} of {self.total} done, in flight {shown} ({elapsed:.0f} s)")
        self.seen, lines = self._lines(self.seen)
        for line in lines:
            progress.say(f"  {line}")

    def _lines(self, seen: int) -> tuple[int, list[str]]:
        import ray

        try:
            return ray.get(self.board.since.remote(seen), timeout=5)
        except Exception:  # noqa: BLE001 - a slow or lost board costs the workers' lines, never the stage
            return seen, []


def _result(ref: Any, shard: str) -> Any:
    """The shard's result, or a WorkerLost when its worker died more often than the retries allow (an error
    raised by the work itself is the work's to report, and propagates)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError

    try:
        return ray.get(ref)
    except (WorkerCrashedError, ActorDiedError, ActorUnavailableError, NodeDiedError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return WorkerLost(f"its worker died and Ray's retries were spent ({type(error).__name__}: {first_line})")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


_started_here: list[bool] = []  # whether this process started the embedded Ray it is connected to


def connect(settings: EngineSettings) -> bool:
    """Connect this process to Ray once (reused afterwards: starting an embedded Ray costs seconds); returns
    whether the Ray it uses is an embedded one this process started."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=settings.address or "local",  # "local": a new Ray of our own, never a cluster found on the machine
            num_cpus=settings.local_cpus if settings.address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": forwarded_env()},
        )
        _started_here[:] = [settings.address is None]
    return bool(_started_here and _started_here[0])


def open_engine(settings: EngineSettings) -> Engine:
    return InlineEngine() if settings.kind == "inline" else RayEngine(settings)

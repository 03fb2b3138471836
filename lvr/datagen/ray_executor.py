"""The Ray executor of the datagen stages: shards pulled from one queue by a pool of Ray workers.

``lvr datagen run --executor ray`` (``--address`` joins an existing cluster; without it a local
Ray is started for the run and stopped after it). The runner (`lvr.datagen.runner`) plans a
stage's shards as for one machine and hands the unfinished ones to `RayExecutor.execute`::

    driver: plan all shards -> skip finished (markers) -> queue
    worker i (a Ray actor, one CPU): open the stage's worker once -> for each shard it is given:
        rows -> shard files -> marker (the commit point) -> usage of its model calls
    driver: hand the next shard to whichever worker is free; one progress bar; manifest

- No static assignment: a worker takes the next shard when it is done with its last one, so a
  slow shard holds one worker, not a machine's share of the job.
- A worker process that dies (killed, OOM, segfault) is restarted and its shard run again, up to
  ``max_retries`` times (Ray's actor restarts with task retries); the shard's marker is written
  only after its files, so a half-written shard is never taken for a finished one.
- The completion markers stay the single source of truth: the shards, their files and markers
  are those of a local run or of a Slurm array (``--shard i --num-shards n``), so any of the
  three resumes what another began.
- Model calls: every worker spends ONE request budget of the whole job through a limiter actor
  (`lvr.backends.limits.SharedLimiter`), writes its own request cache
  (``cache/requests-ray<i>.sqlite``; lookups read the others) and reports the usage of each shard
  to the driver, which puts the sum in the stage manifest.

Every worker must see the run folder at the same path (a shared file system on a cluster) and
have lvr installed. Ray is the optional ``ray`` extra (``pip install "lvr[ray]"``).

Deliberate simplifications: a worker asks Ray for one CPU and nothing else (local ``hf`` models
on GPUs are not scheduled onto GPUs: use an OpenAI-compatible server for them); a backend's
``concurrency`` is per worker, like per machine in a Slurm array (the rate limits are the job's).
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import rows_to_table
from lvr.backends import Usage
from lvr.backends.limits import SharedLimiter, limiter_actor
from lvr.datagen.common import ModelBackends
from lvr.datagen.config import DatagenConfig
from lvr.datagen.runner import StageContext
from lvr.errors import LvrError
from lvr.layout import RunLayout
from lvr.stages import Shard, Stage


class RayExecutorError(LvrError):
    """Ray is missing, the cluster cannot be reached, or shards kept killing their workers."""


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RayExecutorError(
            "--executor ray needs Ray: pip install 'lvr[ray]' (or run without --executor ray)"
        ) from None
    return ray


@dataclass
class RayExecutor:
    """Where and how wide the shards of a datagen stage run on Ray.

    Use as a context manager around the stages of one job: a local Ray started here is stopped
    on exit; a cluster joined with ``address`` is left running.

    Attributes:
        address: A running cluster (``ray://head:10001``, ``auto``...); None starts a local Ray.
        workers: Shard workers running at once (one CPU each); 0 = the cluster's CPUs.
        max_retries: Times a worker process is restarted after it died (its shard is then run
            again); a worker that dies once more leaves its shard unfinished (one-line error at
            the end, the other shards are finished first).
    """

    address: str | None = None
    workers: int = 0
    max_retries: int = 3
    _started: bool = field(default=False, init=False, repr=False)

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Connect to ``address``, or start a local Ray (an already connected one is reused)."""
        ray = import_ray()
        if self.workers < 0 or self.max_retries < 0:
            raise RayExecutorError("--workers and max_retries must be >= 0")
        if ray.is_initialized():
            return
        quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
        try:
            if self.address:
                ray.init(address=self.address, **quiet)
            else:  # "local": a new Ray for this run, never a cluster someone left running here
                ray.init(address="local", num_cpus=self.workers or None, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise RayExecutorError(
                f"could not start {where}: {' '.join(str(exc).split())}"
            ) from None
        self._started = True

    def stop(self) -> None:
        """Stop the local Ray this executor started (a joined cluster keeps running)."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def describe(self) -> dict[str, Any]:
        """For the stage manifest: the executor, the cluster and the workers it may use."""
        ray = import_ray()
        cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else None
        return {"kind": "ray", "address": self.address or "local", "cluster_cpus": cpus,
                "workers": self.workers or cpus, "max_retries": self.max_retries}  # fmt: skip

    def pool_size(self, shards: int) -> int:
        """Workers for ``shards`` shards: ``workers`` (or the cluster's CPUs), at most one each."""
        cpus = int(import_ray().cluster_resources().get("CPU", 1))
        return max(1, min(self.workers or cpus, shards))

    def model_calls(self, options: Mapping[str, Any]) -> WorkerCalls:
        """The job's shared request budget (a limiter actor) and the tally of its workers' usage."""
        rpm, tpm = options.get("max_requests_per_minute"), options.get("max_tokens_per_minute")
        name = f"lvr-limiter-{uuid.uuid4().hex[:12]}" if rpm or tpm else None
        actor = limiter_actor(rpm, tpm, name) if name else None
        job = {"max_requests_per_minute": rpm, "max_tokens_per_minute": tpm}
        return WorkerCalls(actor, name, job)

    def execute(
        self, stage: Any, cfg: DatagenConfig, layout: RunLayout, calls: WorkerCalls | None,
        todo: Sequence[Shard],
    ) -> Iterator[Shard]:  # fmt: skip
        """Run ``todo`` on a pool of workers; yield each shard once its marker is written.

        Raises:
            RayExecutorError: Some shards killed their worker more than ``max_retries`` times
                (the others are finished and kept: a rerun retries those).
            LvrError: The stage's worker refused the config (the same one-line error as a local
                run); any other exception of the stage's code stops the stage, as locally.
        """
        ray = import_ray()
        if not todo:
            if calls is not None and calls.actor is not None:
                ray.kill(calls.actor)
            return
        actor = ray.remote(num_cpus=1, max_restarts=self.max_retries,
                           max_task_retries=self.max_retries)(ShardWorker)  # fmt: skip
        limiter, job = (calls.name, calls.job) if calls is not None else (None, {})
        pool = [actor.remote(stage, cfg, str(layout.root), i, limiter, job)
                for i in range(self.pool_size(len(todo)))]  # fmt: skip
        try:
            _get(ray, [w.ready.remote() for w in pool])  # a config the worker refuses: one line
            yield from self._dispatch(ray, stage.name, pool, todo, calls)
        finally:
            _close(ray, pool)
            if calls is not None and calls.actor is not None:
                ray.kill(calls.actor)  # the budget of this stage is spent

    def _dispatch(
        self, ray: Any, name: str, pool: list[Any], todo: Sequence[Shard], calls: WorkerCalls | None
    ) -> Iterator[Shard]:
        """Hand each idle worker the next shard until the queue is empty (one in flight each)."""
        queue, idle = collections.deque(todo), list(pool)
        running: dict[Any, tuple[Any, Shard]] = {}
        lost: list[Shard] = []
        while queue or running:
            while idle and queue:
                worker, shard = idle.pop(), queue.popleft()
                running[worker.run.remote(shard)] = (worker, shard)
            if not running:  # every worker died for good: what is left is not run
                lost.extend(queue)
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            worker, shard = running.pop(ref)
            try:
                usage = _get(ray, ref)
            except ray.exceptions.RayActorError:  # died more than max_retries times
                lost.append(shard)
                continue
            if calls is not None:
                calls.add(usage)
            idle.append(worker)
            yield shard
        if lost:
            names = ", ".join(s.name for s in lost)
            raise RayExecutorError(
                f"{name}: shards {names} were not finished: their Ray worker died "
                f"{self.max_retries + 1} times (see the Ray worker logs); the finished shards are "
                f"kept, rerun the same command to retry the others"
            )


class WorkerCalls:
    """The model-call side of a Ray stage: the shared limiter and the sum of the workers' usage.

    What `lvr.datagen.common.CallReport` reads for the manifest (``usage()``, ``rate_limits()``).
    """

    def __init__(self, actor: Any, name: str | None, job: dict[str, Any]):
        self.actor, self.name, self.job = actor, name, job  # the limiter actor and its name
        self.total: dict[str, Usage] = {}

    def add(self, usage: Mapping[str, Mapping[str, Any]]) -> None:
        """Add one shard's usage per model (as sent back by a worker)."""
        for model, counts in usage.items():
            self.total[model] = self.total.get(model, Usage()) + Usage.from_dict(counts)

    def usage(self) -> dict[str, Usage]:
        return dict(self.total)

    def rate_limits(self) -> dict[str, Any] | None:
        if self.actor is None:
            return None
        return {**SharedLimiter(self.actor, self.job).describe(), "executor": "ray"}


class ShardWorker:
    """One Ray worker of a stage (a Ray actor): opens the stage's worker once, runs shards.

    Errors while opening (a config the stage refuses) are kept and raised by `ready`, so they
    reach the driver as the stage's own exception rather than as a dead actor.

    Args:
        stage: The `lvr.datagen.runner.DatagenStage`.
        cfg: The datagen config.
        root: The run folder (the same path on every node).
        index: This worker's number (names its request cache).
        limiter: Name of the job's limiter actor (`lvr.backends.limits.limiter_actor`; a name,
            not a handle: a handle among the arguments puts them in Ray's object store, where a
            restarted worker may not find them); None: no limits.
        job: The job's limits the actor enforces (for the manifest).
    """

    def __init__(
        self, stage: Any, cfg: DatagenConfig, root: str, index: int, limiter: str | None,
        job: dict[str, Any],
    ):  # fmt: skip
        self.stage = stage
        self.target = Stage(RunLayout(Path(root)), stage.name)
        self.models: ModelBackends | None = None
        self.worker: Any = None
        self.failed: BaseException | None = None
        try:
            if stage.models is not None:
                kind, options = stage.models(cfg)
                shared = None
                if limiter is not None:
                    shared = SharedLimiter(import_ray().get_actor(limiter), job)
                cache = self.target.layout.request_cache(worker=f"ray{index}")
                self.models = ModelBackends(kind, options, cache, limiter=shared)
            # One CPU per worker: the stage must not start its own process pool on top.
            ctx = StageContext(self.target.layout, index, 1, False, self.models, parallel=False)
            self.worker = stage.open_worker(cfg, ctx)
            # pyarrow's first Table.from_pylist imports pandas (~0.2 s): paid while the worker
            # starts, not in its first shard, where every request slot would wait for it.
            for table in stage.tables:
                rows_to_table([], table)
        except Exception as exc:  # raised by `ready`, in the driver's terms
            self.failed = exc

    def ready(self) -> bool:
        """Raise what opening the stage's worker raised; True when it opened."""
        if self.failed is not None:
            raise self.failed
        return True

    def run(self, shard: Shard) -> dict[str, dict[str, Any]]:
        """Run one shard: rows, shard files, marker. Returns the usage of its model calls."""
        before = self.models.usage() if self.models else {}
        rows = self.worker(shard.items)
        tables: dict[str, pa.Table] = {t: rows_to_table(rows[t], t) for t in self.stage.tables}
        self.target.write_shard(shard, tables)
        after = self.models.usage() if self.models else {}
        return {m: (u - before.get(m, Usage())).to_dict() for m, u in after.items()}

    def close(self) -> None:
        if hasattr(self.worker, "close"):
            self.worker.close()
        if self.models is not None:
            self.models.close()


def _get(ray: Any, refs: Any) -> Any:
    """``ray.get``, re-raising a user error of the stage's code as itself (one line, no trace)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LvrError):
            raise cause from None
        raise


def _close(ray: Any, pool: list[Any]) -> None:
    """Close the workers (caches, connections), then end their processes."""
    closing = [w.close.remote() for w in pool]
    ray.wait(closing, num_returns=len(closing), timeout=60)  # a dead worker's error is not raised
    for w in pool:
        ray.kill(w)

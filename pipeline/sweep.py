"""The driver — with :mod:`pipeline.shards` (data-parallel HVPs), the only Ray code. It connects to Ray,
checks the request against the cluster before any work starts, skips what a previous run of the same
command finished, and keeps a bounded number of tasks in flight with a ``ray.wait`` loop, so progress
shows as results arrive and a sweep of 10,000 runs floods neither the scheduler nor the object store.

Training tasks return small checkpoint descriptors; Hessian tasks for finished runs start while other
runs still train, grouped by loss function up to ``hessian.batch_checkpoints`` per task.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field

import ray
from omegaconf import DictConfig, OmegaConf

from pipeline import jobs, shards, tables
from pipeline.config import ConfigError, validate
from pipeline.plan import Run, expand
from pipeline.progress import Progress
from pipeline.storage import Store


@dataclass
class SweepSummary:
    sweep: str
    root: str
    runs_total: int
    runs_skipped: int
    run_status: dict = field(default_factory=dict)
    points: int = 0
    points_failed: int = 0
    labels: dict = field(default_factory=dict)
    seconds: float = 0.0
    runs_failed_planned: int = 0  # failed runs among this command's plan (the exit code's business)
    points_failed_planned: int = 0  # failed points of this plan's runs


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote
def _train_task(store_uri: str, sweep: str, run: Run, num_cpus: float, state_every_s: float):
    _threads(num_cpus)
    return jobs.train_job(store_uri, sweep, run, node_id=_node_id(), state_every_s=state_every_s)


@ray.remote
def _refine_task(store_uri: str, sweep: str, ref, num_cpus: float):
    import torch

    _threads(num_cpus)
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    try:
        return jobs.refine_job(store_uri, sweep, ref, device=device, node_id=_node_id())
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


@ray.remote
def _hessian_task(store_uri: str, sweep: str, refs: list, num_cpus: float):
    import torch

    _threads(num_cpus)
    # A task given a GPU by Ray on a machine where torch sees none (a CPU build) runs on the CPU.
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    try:
        return jobs.hessian_job(store_uri, sweep, refs, device=device, node_id=_node_id(),
                                hvp_shards=shards.sharded_hvp)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()  # give the GPU back to the next task sharing it


_CONNECTED = None  # the ray config connect() last started or attached a Ray with, while it runs


def connect(ray_cfg) -> None:
    """Start a local Ray, or attach to ``ray.address`` (``auto``, ``host:port``, ``ray://host:port``).

    Under ``ray job submit`` (``RAY_ADDRESS`` set) the default attaches to the job's cluster; otherwise
    it starts its own Ray even where ``ray start`` left one running (``ray=cluster`` attaches to that).
    A Ray this function started is reused by the next sweep of the process (the jobs of a Hydra
    multirun) when that asks for the same, and restarted when it asks for another address, CPU count or
    runtime_env; a Ray initialised by someone else is reused as it is.
    """
    global _CONNECTED
    wanted = OmegaConf.to_container(ray_cfg, resolve=True)
    wanted = {k: wanted.get(k) for k in ("address", "num_cpus", "runtime_env")}
    if ray.is_initialized():
        if _CONNECTED is None or _CONNECTED == wanted:
            return
        ray.shutdown()
    _CONNECTED = None
    kwargs = {"log_to_driver": True}
    if ray_cfg.runtime_env:
        kwargs["runtime_env"] = OmegaConf.to_container(ray_cfg.runtime_env, resolve=True)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=False, **kwargs)
        _CONNECTED = wanted
        return
    name = "ray.address" if ray_cfg.address else "RAY_ADDRESS (environment)"
    if ray_cfg.num_cpus is not None:
        raise ConfigError(f"ray.num_cpus={ray_cfg.num_cpus} only applies to a local Ray; the cluster at "
                          f"{name}={address!r} offers the CPUs its nodes were started with")
    check_reachable(address, name)
    try:
        ray.init(address=address, **kwargs)
        _CONNECTED = wanted
    except (ConnectionError, RuntimeError, ValueError) as err:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":  # Ray's own message does not say it was auth
            hint = " (if the cluster uses token auth, as `ray start` does from Ray 2.60, set RAY_AUTH_MODE=token)"
        raise ConfigError(f"{name}={address!r}: cannot connect: {err}{hint}") from None


def check_reachable(address: str, name: str = "ray.address", timeout_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` unless something listens at ``address``'s ``host:port``.

    Without this, ``ray.init`` retries an unreachable head for many minutes (over 10 with Ray 2.60).
    ``auto`` needs no check: Ray looks for a cluster on this machine and fails at once if none runs.
    """
    if address == "auto":
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{name}={address!r} is not allowed: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"{name}={address!r} is not reachable: nothing answers at {host}:{port} "
                          f"within {timeout_s:g}s ({err})") from None


def preflight(cfg: DictConfig) -> None:
    """Refuse requests the cluster can never satisfy, before any task is submitted."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    max_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    h = cfg.hessian
    sections = ("hessian", "refine") if cfg.refine.method != "none" else ("hessian",)  # tasks that will run
    for section in sections:
        gpus = cfg[section].num_gpus
        if gpus > 0 and max_gpu == 0:
            raise ConfigError(f"{section}.num_gpus={gpus} but the Ray cluster has no GPU; "
                              f"use {section}.num_gpus=0 to run on CPU")
        if gpus > max_gpu:
            raise ConfigError(f"{section}.num_gpus={gpus} but the largest node has {max_gpu:g} GPU(s)")
    needs = [("ray.train_num_cpus", cfg.ray.train_num_cpus)] + [(f"{s}.num_cpus", cfg[s].num_cpus) for s in sections]
    for key, need in needs:
        if need > max_cpu:
            raise ConfigError(f"{key}={need} but the largest node has {max_cpu:g} CPU(s)")
    if h.data_workers and data_parallel_cap(h) == 0:
        k = h.data_workers
        raise ConfigError(f"hessian.data_workers={k}: a Hessian task and its {k} workers hold "
                          f"{k + 1}×hessian.num_cpus={(k + 1) * h.num_cpus:g} CPU(s)"
                          + (f" and {(k + 1) * h.num_gpus:g} GPU(s)" if h.num_gpus else "")
                          + f" at once, more than the cluster's {_total('CPU'):g} CPU(s)"
                          + (f" and {_total('GPU'):g} GPU(s)" if h.num_gpus else "")
                          + ": use fewer workers or fewer CPUs/GPUs each")
    if h.memory_budget_mb > 0:
        max_mem = max((n["Resources"].get("memory", 0) for n in nodes), default=0) / 2**20
        if max_mem and h.memory_budget_mb > max_mem:
            raise ConfigError(f"hessian.memory_budget_mb={h.memory_budget_mb:g} but the largest node offers "
                              f"{max_mem:.0f} MB to Ray tasks")


def _total(resource: str) -> float:
    return float(ray.cluster_resources().get(resource, 0))


def data_parallel_cap(h) -> int:
    """How many Hessian tasks with ``hessian.data_workers`` > 0 may run at once: each holds its own
    resources while it waits for its workers' (``num_cpus`` / ``num_gpus`` each), so tasks that together
    hold more than the cluster has could each wait for the others for ever. 0: not even one fits."""
    k = h.data_workers
    cap = int(_total("CPU") // ((k + 1) * h.num_cpus))
    if h.num_gpus:
        cap = min(cap, int(_total("GPU") // ((k + 1) * h.num_gpus)))
    return cap


def resolve_root(cfg: DictConfig) -> str:
    root = str(cfg.results_root)
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))


def run_sweep(cfg: DictConfig) -> SweepSummary:
    """Run (or resume) the sweep that ``cfg`` describes; return what is in its tables at the end."""
    t0 = time.monotonic()
    validate(cfg)
    store = Store.open(resolve_root(cfg))
    store.check_writable()
    name = str(cfg.sweep.name)
    runs = expand(cfg)
    connect(cfg.ray)
    preflight(cfg)

    refining = cfg.refine.method != "none"
    todo, missing = plan_resume(store, name, runs, refining)
    todo = collections.deque(todo)
    groups: dict[str, list] = collections.defaultdict(list)
    to_refine: collections.deque = collections.deque()  # checkpoints waiting for their refinement task
    for ref in missing:
        (to_refine if ref.stage == "refined" else groups[ref.group]).append(ref)

    cap = cfg.sweep.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    h, rc = cfg.hessian, cfg.ray
    prog = Progress(len(runs), mode=cfg.sweep.progress, skipped=len(runs) - len(todo), queued=len(todo))
    in_flight: dict = {}  # object ref -> ("train", Run) | ("hessian", [CheckpointRef]); at most `cap`

    hessian_cap = data_parallel_cap(h) if h.data_workers else None

    def submit_hessians(force: bool) -> bool:
        if hessian_cap is not None and sum(k == "hessian" for k, _ in in_flight.values()) >= hessian_cap:
            return False
        for key, refs in list(groups.items()):
            if refs and (force or len(refs) >= h.batch_checkpoints):
                batch, groups[key] = refs[: h.batch_checkpoints], refs[h.batch_checkpoints:]
                task = _hessian_task.options(num_cpus=h.num_cpus, num_gpus=h.num_gpus or None,
                                             max_retries=rc.max_retries)
                in_flight[task.remote(store.uri, name, batch, h.num_cpus)] = ("hessian", batch)
                return True
        return False

    def pending_points() -> int:
        waiting = sum(len(v) for v in groups.values()) + len(to_refine)
        return waiting + sum(len(p) if kind == "hessian" else 1 for kind, p in in_flight.values() if kind != "train")

    def new_refs(refs: list) -> None:
        for ref in refs:
            groups[ref.group].append(ref)
            if refining:
                to_refine.append(dataclasses.replace(ref, stage="refined"))

    r = cfg.refine
    while todo or in_flight or any(groups.values()) or to_refine:
        while len(in_flight) < cap:
            if submit_hessians(force=False):
                continue
            if to_refine:
                ref = to_refine.popleft()
                task = _refine_task.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus or None,
                                            max_retries=rc.max_retries)
                in_flight[task.remote(store.uri, name, ref, r.num_cpus)] = ("refine", ref)
                continue
            if todo:
                run = todo.popleft()
                task = _train_task.options(num_cpus=rc.train_num_cpus, max_retries=rc.max_retries)
                obj = task.remote(store.uri, name, run, rc.train_num_cpus, rc.state_every_s)
                in_flight[obj] = ("train", run)
                prog.queued, prog.running = len(todo), prog.running + 1
                continue
            if not submit_hessians(force=True):
                break
        prog.points_pending = pending_points()
        prog.update()
        if not in_flight:
            continue
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        for obj in ready:
            kind, payload = in_flight.pop(obj)
            if kind == "train":
                new_refs(_finish_train(store, name, obj, payload, prog))
            else:
                _finish_hessian(store, name, obj, [payload] if kind == "refine" else payload, prog)
    prog.points_pending = 0
    prog.close()
    return summarize(store, name, runs, prog.skipped, time.monotonic() - t0)


def plan_resume(store: Store, name: str, runs: list[Run], refining: bool = False) -> tuple[list[Run], list]:
    """What a previous attempt of this sweep left to do: the runs without an ok/diverged ``runs`` row,
    and the checkpoints of finished runs without an ok ``points`` row (with ``refining``, also those
    without an ok ``stage=refined`` row: returned as refs of stage ``refined``). Only runs with fewer ok
    points than expected have their checkpoint files listed, so resuming a big finished sweep stays cheap."""
    rows = tables.read(store, name, "runs", columns=["status", "n_checkpoints"]).to_pylist()
    finished = {r["run_id"]: r["n_checkpoints"] for r in rows if r["status"] in ("ok", "diverged")}
    done_points = tables.done_keys(store, name, "points")
    analysed = collections.Counter(key[0] for key in done_points)
    todo, missing = [], []
    for run in runs:
        if run.run_id not in finished:
            todo.append(run)
        elif finished[run.run_id] is None or analysed[run.run_id] < finished[run.run_id] * (1 + refining):
            for ref in jobs.existing_checkpoints(store, name, run):
                wanted = [ref, dataclasses.replace(ref, stage="refined")] if refining else [ref]
                missing += [w for w in wanted if (w.run_id, w.step, w.stage) not in done_points]
    return todo, missing


def _finish_train(store: Store, name: str, obj, run: Run, prog: Progress) -> list:
    """Record a finished training task; return its checkpoint refs."""
    prog.running -= 1
    try:
        status, refs = ray.get(obj)
    except ray.exceptions.RayError as err:  # the worker died more often than ray.max_retries allows
        tables.write(store, name, "runs", [jobs.run_row(name, run, status="failed",
                                                        error=f"{type(err).__name__}: {err}")])
        prog.failed += 1
        return []
    prog.failed += status == "failed"
    prog.diverged += status == "diverged"
    prog.done += status == "ok"
    return refs


def _finish_hessian(store: Store, name: str, obj, refs: list, prog: Progress) -> None:
    """Record a finished Hessian or refinement task: the job returns how many of its points failed."""
    try:
        failed = ray.get(obj)
        prog.points_done += len(refs) - failed
        prog.points_failed += failed
    except ray.exceptions.RayError as err:
        # The task may have written some points before its worker died: keep those, fail the rest.
        done = tables.done_keys(store, name, "points")
        lost = [r for r in refs if (r.run_id, r.step, r.stage) not in done]
        for r in lost:
            tables.write(store, name, "points", [{"run_id": r.run_id, "step": r.step, "stage": r.stage,
                                                  "seed": r.seed, "status": "failed",
                                                  "error": f"{type(err).__name__}: {err}"}])
        prog.points_done += len(refs) - len(lost)
        prog.points_failed += len(lost)


def summarize(store: Store, name: str, planned: list[Run], skipped: int, seconds: float) -> SweepSummary:
    """What the sweep's tables hold now; the failures among ``planned`` runs and their points apart."""
    runs = tables.read(store, name, "runs", columns=["status"]).to_pandas()
    points = tables.read(store, name, "points", columns=["status", "label"]).to_pandas()
    ok_points = points[points["status"] == "ok"] if len(points) else points
    ids = {run.run_id for run in planned}
    failed_runs = runs[runs["status"] == "failed"] if len(runs) else runs
    failed_points = points[points["status"] == "failed"] if len(points) else points
    return SweepSummary(
        sweep=name, root=store.uri, runs_total=len(planned), runs_skipped=max(skipped, 0),
        run_status=runs["status"].value_counts().to_dict() if len(runs) else {},
        points=len(ok_points), points_failed=len(failed_points),
        labels=ok_points["label"].value_counts().to_dict() if len(ok_points) else {}, seconds=seconds,
        runs_failed_planned=int(failed_runs["run_id"].isin(ids).sum()) if len(failed_runs) else 0,
        points_failed_planned=int(failed_points["run_id"].isin(ids).sum()) if len(failed_points) else 0)

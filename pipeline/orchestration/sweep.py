"""The driver — with :mod:`pipeline.orchestration.shards` (data-parallel HVPs), the only Ray code. It connects to Ray,
checks the request against the cluster before any work starts, skips what a previous run of the same
command finished, and keeps a bounded number of tasks in flight with a ``ray.wait`` loop, so progress
shows as results arrive and a sweep of 10,000 runs floods neither the scheduler nor the object store.

Training tasks return small checkpoint descriptors; Hessian tasks for finished runs start while other
runs still train, grouped by loss function up to ``hessian.batch_checkpoints`` per task.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Iterable
from dataclasses import dataclass, field

import ray
from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration import identity, jobs, rows, shards, tables
from pipeline.orchestration.config import ConfigError, new_sweep_refusals, validate
from pipeline.orchestration.lease import CANCEL_WAIT_S, Lease
from pipeline.orchestration.plan import Run, expand
from pipeline.orchestration.progress import Progress
from pipeline.orchestration.storage import Store, StorageFull


log = logging.getLogger("minratio")


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
    by_grid_point: list = field(default_factory=list)  # rows of :func:`by_grid_point`


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _task_device() -> str:
    """``cuda`` where Ray gave this task a GPU and torch sees one; else ``cpu`` (a task given a GPU by Ray
    on a machine whose torch is a CPU build runs on the CPU, and its row's ``device`` says so)."""
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _release(device: str) -> None:
    """Give the GPU's cached memory back to the next task sharing it."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


@ray.remote
def _train_task(store_uri: str, sweep: str, run: Run, num_cpus: float, state_every_s: float):
    _threads(num_cpus)
    device = _task_device()
    t0 = time.monotonic()
    try:
        out = jobs.train_job(store_uri, sweep, run, node_id=_node_id(), state_every_s=state_every_s,
                             device=device)
        return time.monotonic() - t0, out
    finally:
        _release(device)


@ray.remote
def _refine_task(store_uri: str, sweep: str, ref, num_cpus: float):
    _threads(num_cpus)
    device = _task_device()
    t0 = time.monotonic()
    try:
        failed = jobs.refine_job(store_uri, sweep, ref, device=device, node_id=_node_id())
        return time.monotonic() - t0, failed
    finally:
        _release(device)


@ray.remote
def _hessian_task(store_uri: str, sweep: str, refs: list, num_cpus: float):
    _threads(num_cpus)
    device = _task_device()
    t0 = time.monotonic()
    try:
        failed = jobs.hessian_job(store_uri, sweep, refs, device=device, node_id=_node_id(),
                                  hvp_shards=shards.sharded_hvp)
        return time.monotonic() - t0, failed
    finally:
        _release(device)


_CONNECTED = None  # the ray config connect() last started or attached a Ray with, while it runs
_RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_token_notice(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that a new local cluster has token authentication on (Ray >= 2.60 prints it at
    every start unless RAY_AUTH_MODE is set): the local default keeps Ray's token, and docs/cluster.md
    says so. Setting RAY_AUTH_MODE here instead would not reach Ray's configuration, read at import."""
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


@contextlib.contextmanager
def _keep_sigterm_handler():
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit``; keep a handler the caller
    installed (the CLI's clean stop, :func:`pipeline.orchestration.cli.stop_on_signals`)."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def connect(ray_cfg) -> None:
    """Start a local Ray, or attach to ``ray.address`` (``auto``, ``host:port``, ``ray://host:port``).

    Under ``ray job submit`` (``RAY_ADDRESS`` set) the default attaches to the job's cluster; otherwise
    it starts its own Ray even where ``ray start`` left one running (``ray=cluster`` attaches to that).
    A Ray this function started is reused by the next sweep of the process (the jobs of a Hydra
    multirun) when that asks for the same, and restarted when it asks for another address, CPU count or
    runtime_env; a Ray initialised by someone else is reused as it is.
    """
    global _CONNECTED
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    wanted = OmegaConf.to_container(ray_cfg, resolve=True)
    wanted = {k: wanted.get(k) for k in ("address", "num_cpus", "runtime_env")}
    if ray.is_initialized() and _CONNECTED is None:
        return  # someone else's Ray (a notebook's ray.init), whatever it is attached to
    if not address and ray_cfg.get("autoscaler"):
        raise ConfigError("ray.autoscaler=true but this sweep starts a local Ray, which adds no nodes: use it with "
                          "ray=cluster (or ray.address) on a cluster that has an autoscaler")
    if ray.is_initialized():
        if _CONNECTED == wanted:
            return
        ray.shutdown()
    _CONNECTED = None
    kwargs = {"log_to_driver": True}
    if ray_cfg.runtime_env:
        kwargs["runtime_env"] = OmegaConf.to_container(ray_cfg.runtime_env, resolve=True)
    if not address:
        logging.getLogger(_RAY_TOKEN_LOGGER).addFilter(_quiet_token_notice)
        with _keep_sigterm_handler():
            ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=False, **kwargs)
        _CONNECTED = wanted
        return
    name = "ray.address" if ray_cfg.address else "RAY_ADDRESS (environment)"
    if ray_cfg.num_cpus is not None:
        raise ConfigError(f"ray.num_cpus={ray_cfg.num_cpus} only applies to a local Ray; the cluster at "
                          f"{name}={address!r} offers the CPUs its nodes were started with")
    check_reachable(address, name)
    try:
        with _keep_sigterm_handler():
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


def check_problems(runs: list[Run]) -> None:
    """Build each distinct problem of the plan once, before anything trains, and refuse what would fail
    in every run: a data set that cannot be read (a missing folder, an import path that does not
    resolve), a user's module that is not an ``nn.Module`` or whose loss is not a deterministic, vmappable
    function of θ (:func:`pipeline.curvature.torch_model.check_model`), a ``hessian.params`` that picks nothing."""
    import json

    from pipeline.curvature import params, torch_model
    from pipeline.orchestration.train import run_problem

    seen = set()
    for run in runs:
        c = run.config
        key = json.dumps([dataclasses.asdict(c.data), dataclasses.asdict(c.model), c.hessian.params],
                         sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        where = f" (sweep.grid point {run.overrides})" if run.overrides else ""
        try:
            problem = run_problem(c, run.seed)
            model, data = problem.model, problem.data
            params.select(model.segments(), c.hessian.params)
            if isinstance(model, torch_model.TorchModel):
                k = min(data.n, 8)
                torch_model.check_model(model, problem.loss_fn(data.X[:k], data.Y[:k]), model.init(run.seed),
                                        data.X[:k], data.Y[:k], data.out_dim)
        except Exception as err:  # noqa: BLE001 — whatever fails here would fail every run of the point
            raise ConfigError(f"{err}{where}" if isinstance(err, ValueError) else
                              f"building the model or data failed{where}: {type(err).__name__}: {err}") from None


def preflight(cfg: DictConfig) -> None:
    """Refuse requests no live node can ever satisfy, before any task is submitted.

    With ``ray.autoscaler=true`` (a cluster that adds nodes on demand: the Ray autoscaler, KubeRay) what no
    live node offers yet is logged instead, and those tasks wait, as Ray's own would, for a node that does.
    """
    problems, memory = unmet_requests(cfg), memory_unmet(cfg)
    if cfg.ray.autoscaler:
        for problem in problems:
            log.warning(f"{problem} — with ray.autoscaler=true, those tasks wait until the cluster adds a node "
                        "that can run them")
        if memory:  # tasks do not ask Ray for memory, so no node is added for it: say what may happen
            log.warning(f"{memory} — nodes added later may offer more; a Hessian task on a node with less may run "
                        "out of memory (its points become failed rows)")
        return
    if problems:
        hint = ""
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            hint = " (if this cluster adds nodes on demand, set ray.autoscaler=true to let the tasks wait for them)"
        raise ConfigError(problems[0] + hint)
    if memory:
        raise ConfigError(memory)


def unmet_requests(cfg: DictConfig) -> list[str]:
    """What the sweep's tasks ask Ray for that no live node offers (GPUs, CPUs per task), and data-parallel
    Hessian tasks that could never all hold their workers at once; each names its key."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    max_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    h = cfg.hessian
    sections = ("hessian", "refine") if cfg.refine.method != "none" else ("hessian",)  # tasks that will run
    out = []
    gpu_keys = [("ray.train_num_gpus", cfg.ray.train_num_gpus)]
    gpu_keys += [(f"{s}.num_gpus", cfg[s].num_gpus) for s in sections]
    for key, gpus in gpu_keys:
        if gpus > 0 and max_gpu == 0:
            out.append(f"{key}={gpus} but the Ray cluster has no GPU; use {key}=0 to run on CPU")
        elif gpus > max_gpu:
            out.append(f"{key}={gpus} but the largest node has {max_gpu:g} GPU(s)")
    needs = [("ray.train_num_cpus", cfg.ray.train_num_cpus)] + [(f"{s}.num_cpus", cfg[s].num_cpus) for s in sections]
    for key, need in needs:
        if need > max_cpu:
            out.append(f"{key}={need} but the largest node has {max_cpu:g} CPU(s)")
    if h.data_workers and data_parallel_cap(h) == 0:
        k = h.data_workers
        out.append(f"hessian.data_workers={k}: a Hessian task and its {k} workers hold "
                   f"{k + 1}×hessian.num_cpus={(k + 1) * h.num_cpus:g} CPU(s)"
                   + (f" and {(k + 1) * h.num_gpus:g} GPU(s)" if h.num_gpus else "")
                   + f" at once, more than the cluster's {_total('CPU'):g} CPU(s)"
                   + (f" and {_total('GPU'):g} GPU(s)" if h.num_gpus else "")
                   + ": use fewer workers or fewer CPUs/GPUs each")
    return out


def memory_unmet(cfg: DictConfig) -> str:
    """Why ``hessian.memory_budget_mb`` exceeds what the largest live node offers Ray tasks, or ""."""
    h = cfg.hessian
    if h.memory_budget_mb <= 0:
        return ""
    max_mem = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0) / 2**20
    if max_mem and h.memory_budget_mb > max_mem:
        return f"hessian.memory_budget_mb={h.memory_budget_mb:g} but the largest node offers {max_mem:.0f} MB to Ray tasks"
    return ""


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


def run_sweep(cfg: DictConfig, set_keys: Iterable[str] = ()) -> SweepSummary:
    """Run (or resume) the sweep that ``cfg`` describes; return what is in its tables at the end.
    ``set_keys``: the dotted keys its command line sets (:func:`pipeline.orchestration.config.new_sweep_refusals`).

    Every check comes before any work: the values, the sweep's recorded experiment, the results root,
    the tolerance the counts can honour, and the cluster's resources."""
    t0 = time.monotonic()
    validate(cfg)
    store = Store.open(resolve_root(cfg))
    name = str(cfg.sweep.name)
    runs = expand(cfg)
    run_ids = [run.run_id for run in runs]
    identity.check(store, name, cfg, run_ids)
    refusals = new_sweep_refusals(cfg, set_keys)
    if refusals:
        resumed = set(run_ids) & identity.known_runs(store, name)
        if not resumed:
            raise ConfigError("; ".join(refusals))
        log.warning(f"{'; '.join(refusals)}. Allowed here because this command resumes a sweep of an earlier "
                    f"version whose run ids hold it ({len(resumed)} of its {len(run_ids)} runs are in the folder)")
    store.check_writable()
    check_problems(runs)
    with Lease(store, name, "minratio-sweep") as lease:
        record = identity.check(store, name, cfg, run_ids)  # again, now that no other command can change it
        connect(cfg.ray)
        preflight(cfg)
        identity.save(store, name, record)
        driver = Driver(cfg, store, name, runs, lease)
        log.info(f"sweep {name!r} in {store.uri}: {len(runs)} run{'s' * (len(runs) != 1)} planned, "
                 f"{driver.prog.skipped} finished earlier; {len(driver.todo)} to train, {driver.prog.points_known} "
                 "checkpoints waiting to be analysed")
        driver.run()
        return summarize(store, name, runs, driver.prog.skipped, time.monotonic() - t0)


class Driver:
    """The bounded ``ray.wait`` loop of one sweep: training tasks, then Hessian tasks (grouped by loss
    function) and refinement tasks for their checkpoints as they appear, at most ``cap`` in flight."""

    def __init__(self, cfg: DictConfig, store: Store, name: str, runs: list[Run], lease: Lease | None = None):
        self.cfg, self.store, self.name, self.lease = cfg, store, name, lease
        self.refining = cfg.refine.method != "none"
        todo, missing = plan_resume(store, name, runs, self.refining)
        self.todo = collections.deque(todo)
        self.groups: dict[str, list] = collections.defaultdict(list)  # loss function -> refs to analyse
        self.to_refine: collections.deque = collections.deque()  # checkpoints waiting for refinement
        for ref in missing:
            (self.to_refine if ref.stage == "refined" else self.groups[ref.group]).append(ref)
        self.in_flight: dict = {}  # object ref -> ("train", Run) | ("hessian", [refs]) | ("refine", ref)
        self.prog = Progress(len(runs), mode=cfg.sweep.progress, skipped=len(runs) - len(todo),
                             points_known=len(missing))
        self.size_to(ray.cluster_resources())
        self._busy_at = float("-inf")

    def size_to(self, total: dict) -> None:
        """Set how many tasks go in flight from the cluster's resources ``total`` (``ray.cluster_resources()``):
        ``cap`` (``sweep.max_in_flight``, else twice the CPUs), the data-parallel Hessian tasks' cap, and the
        training slots behind the progress line's time estimate. With ``ray.autoscaler`` this is redone as
        nodes join (see :meth:`show`): the pending work, which is what an autoscaler adds nodes for, grows
        with the cluster, and analysis tasks (Hessian, refinement) may hold at most half of ``cap``, so
        tasks waiting for a GPU node never keep training from the CPUs there are."""
        cfg = self.cfg
        cpus = float(total.get("CPU", 0))
        slots = cpus / cfg.ray.train_num_cpus  # training tasks that fit at once
        if cfg.ray.train_num_gpus:
            slots = min(slots, float(total.get("GPU", 0)) / cfg.ray.train_num_gpus)
        self.cap = cfg.sweep.max_in_flight or max(2, 2 * int(cpus))
        self.analysis_cap = max(1, self.cap // 2) if cfg.ray.autoscaler else self.cap
        # data-parallel Hessian tasks at once; on a growing cluster at least one, to wait for nodes
        self.hessian_cap = (max(int(cfg.ray.autoscaler), data_parallel_cap(cfg.hessian))
                            if cfg.hessian.data_workers else None)
        self.prog.slots = max(1.0, slots)

    def run(self) -> None:
        try:
            while self.todo or self.in_flight or any(self.groups.values()) or self.to_refine:
                if self.lease is not None:
                    self.lease.check()
                self.fill()
                self.show()
                if not self.in_flight:
                    continue
                ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
                for obj in ready:
                    self.collect(obj)
        except BaseException:
            self.cancel_in_flight()
            raise
        self.show()
        self.prog.close()

    def cancel_in_flight(self, wait_s: float = CANCEL_WAIT_S, grace_s: float = 5.0) -> None:
        """End the tasks in flight and wait (at most ``wait_s``) until they have ended: the driver stops on an
        error, an interrupt or a lost lease, and nothing of it may be written once the folder's lease is free.
        (``ray.cancel`` only asks; a task finishing its last write would otherwise land after the release.)
        First a KeyboardInterrupt in each task's Python code; the workers of tasks still running after
        ``grace_s`` (inside a long native call) are killed. Killing first let a task's reply race its
        cancellation in Ray 2.60, which then aborted the driver ("Tried to complete task that was not
        pending"). Every write is whole, so a task ended mid-write leaves no half file; the next resume
        redoes it."""
        refs = list(self.in_flight)
        try:
            for obj in refs:
                ray.cancel(obj, force=False)
            left = ray.wait(refs, num_returns=len(refs), timeout=min(grace_s, wait_s))[1] if refs else []
            for obj in left:
                ray.cancel(obj, force=True)
            if left:
                ray.wait(left, num_returns=len(left), timeout=max(wait_s - grace_s, 0.0))
        except Exception as err:  # noqa: BLE001 — Ray itself may be what failed; the first error goes up
            log.debug(f"could not end the tasks in flight: {err}")

    def fill(self) -> None:
        """Submit tasks until ``cap`` are in flight: full Hessian batches first (they free checkpoints),
        then refinements, then training, then partial Hessian batches."""
        while len(self.in_flight) < self.cap:
            if not (self.submit_hessians(force=False) or self.submit_refine() or self.submit_train()
                    or self.submit_hessians(force=True)):
                return

    def submit_train(self) -> bool:
        if not self.todo:
            return False
        run, rc = self.todo.popleft(), self.cfg.ray
        task = _train_task.options(num_cpus=rc.train_num_cpus, num_gpus=rc.train_num_gpus or None,
                                   max_retries=rc.max_retries)
        self.in_flight[task.remote(self.store.uri, self.name, run, rc.train_num_cpus, rc.state_every_s)] = ("train", run)
        return True

    def analysing(self) -> int:
        return sum(kind != "train" for kind, _ in self.in_flight.values())

    def submit_refine(self) -> bool:
        if not self.to_refine or self.analysing() >= self.analysis_cap:
            return False
        ref, r = self.to_refine.popleft(), self.cfg.refine
        task = _refine_task.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus or None,
                                    max_retries=self.cfg.ray.max_retries)
        self.in_flight[task.remote(self.store.uri, self.name, ref, r.num_cpus)] = ("refine", ref)
        return True

    def submit_hessians(self, force: bool) -> bool:
        """One Hessian task for a group with ``batch_checkpoints`` refs waiting (any refs, with ``force``)."""
        h = self.cfg.hessian
        if self.analysing() >= self.analysis_cap:
            return False
        if self.hessian_cap is not None and sum(k == "hessian" for k, _ in self.in_flight.values()) >= self.hessian_cap:
            return False
        for key, refs in list(self.groups.items()):
            if refs and (force or len(refs) >= h.batch_checkpoints):
                batch, self.groups[key] = refs[: h.batch_checkpoints], refs[h.batch_checkpoints:]
                task = _hessian_task.options(num_cpus=h.num_cpus, num_gpus=h.num_gpus or None,
                                             max_retries=self.cfg.ray.max_retries)
                self.in_flight[task.remote(self.store.uri, self.name, batch, h.num_cpus)] = ("hessian", batch)
                return True
        return False

    def collect(self, obj) -> None:
        kind, payload = self.in_flight.pop(obj)
        if kind == "train":
            refs = _finish_train(self.store, self.name, obj, payload, self.prog)
            for ref in refs:
                self.groups[ref.group].append(ref)
                if self.refining:
                    self.to_refine.append(dataclasses.replace(ref, stage="refined"))
            self.prog.points_known += len(refs) * (1 + self.refining)
            self.prog.work.checkpoints_per_run.append(len(refs) * (1 + self.refining))
        else:
            _finish_hessian(self.store, self.name, obj, [payload] if kind == "refine" else payload, self.prog)

    def show(self) -> None:
        """Update the progress display: counts, what Ray reports busy (at most once a second), time left."""
        prog, now = self.prog, time.monotonic()
        if now - self._busy_at >= 1.0:
            self._busy_at = now
            total, free = ray.cluster_resources(), ray.available_resources()
            if self.cfg.ray.autoscaler:
                self.size_to(total)
            prog.busy = " ".join(f"{r} {total[r] - free.get(r, 0):g}/{total[r]:g}" for r in ("CPU", "GPU")
                                 if total.get(r)) + " busy"
        prog.work.runs_left = len(self.todo) + sum(kind == "train" for kind, _ in self.in_flight.values())
        prog.work.points_left = prog.points_known - prog.points_done - prog.points_failed
        prog.update()


def plan_resume(store: Store, name: str, runs: list[Run], refining: bool = False) -> tuple[list[Run], list]:
    """What a previous attempt of this sweep left to do: the runs without an ok/diverged ``runs`` row,
    and the checkpoints of finished runs without an ok ``points`` row (with ``refining``, also those
    without an ok ``stage=refined`` row: returned as refs of stage ``refined``).

    Every checkpoint of a finished run is verified against its record (:func:`jobs.scan_checkpoints`),
    and one that an analysed point or the run's ``n_checkpoints`` refers to must be there. A finished run
    with a missing or damaged checkpoint is trained again from its start (its checkpoints, then all its
    points, are made again; its rows leave the files compaction merged, :func:`tables.drop_runs`), with one
    warning line per file; every other run goes on as planned."""
    rows = tables.read(store, name, "runs", columns=["status", "n_checkpoints"]).to_pylist()
    finished = {r["run_id"]: r["n_checkpoints"] for r in rows if r["status"] in ("ok", "diverged")}
    done_points = tables.done_keys(store, name, "points")
    referenced = collections.defaultdict(set)  # run_id -> steps whose stalled/final point is analysed
    for run_id, step, stage in done_points:
        if stage != "refined":
            referenced[run_id].add(step)
    todo, missing, retrain = [], [], set()
    for run in runs:
        if run.run_id not in finished:
            todo.append(run)
            continue
        refs, bad = jobs.scan_checkpoints(store, name, run)
        for step in sorted(referenced[run.run_id] - {ref.step for ref in refs}):
            path = jobs.checkpoint_path(name, run.run_id, step)
            bad.setdefault(path, f"checkpoint {store.location(path)} is missing (an analysed point refers to it)")
        problems = list(bad.values())
        expected = finished[run.run_id]
        if not problems and expected is not None and len(refs) < expected:
            problems.append(f"run {run.run_id} wrote {expected} checkpoints, {len(refs)} are under "
                            f"{store.location(name)}/checkpoints/{run.run_id}/")
        if problems:
            for problem in problems:
                log.warning("%s: run %s is trained again from its start", problem, run.run_id)
            todo.append(run)
            retrain.add(run.run_id)
            continue
        for ref in refs:
            wanted = [ref, dataclasses.replace(ref, stage="refined")] if refining else [ref]
            missing += [w for w in wanted if (w.run_id, w.step, w.stage) not in done_points]
    for table in tables.TABLES:  # its old rows, where compaction merged them, would sit beside the new ones
        tables.drop_runs(store, name, table, retrain)
    return todo, missing


def _finish_train(store: Store, name: str, obj, run: Run, prog: Progress) -> list:
    """Record a finished training task; return its checkpoint refs."""
    try:
        took, (status, refs) = ray.get(obj)
    except ray.exceptions.RayError as err:  # the worker died more often than ray.max_retries allows
        _raise_if_full(err)
        tables.write(store, name, "runs", [rows.run_row(name, run, status="failed",
                                                        error=f"{type(err).__name__}: {err}")])
        prog.failed += 1
        return []
    prog.failed += status == "failed"
    prog.diverged += status == "diverged"
    prog.done += status == "ok"
    prog.work.train_s.append(took)
    return refs


def _finish_hessian(store: Store, name: str, obj, refs: list, prog: Progress) -> None:
    """Record a finished Hessian or refinement task: the job returns how many of its points failed."""
    try:
        took, failed = ray.get(obj)
        prog.points_done += len(refs) - failed
        prog.points_failed += failed
        prog.work.point_s.extend([took / len(refs)] * len(refs))
    except ray.exceptions.RayError as err:
        _raise_if_full(err)
        # The task may have written some points before its worker died: keep those, fail the rest.
        done = tables.done_keys(store, name, "points")
        lost = [r for r in refs if (r.run_id, r.step, r.stage) not in done]
        for r in lost:
            key = rows.point_key(r.run_id, r.step, r.stage, r.seed)
            tables.write(store, name, "points", [rows.failed_point_row(key, f"{type(err).__name__}: {err}")])
        prog.points_done += len(refs) - len(lost)
        prog.points_failed += len(lost)


def _raise_if_full(err: Exception) -> None:
    """A task that found the results root full stops the sweep with its one message (recording a
    failed row would need the room that is missing)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, StorageFull):
        raise StorageFull(cause.errno, cause.strerror) from None


def summarize(store: Store, name: str, planned: list[Run], skipped: int, seconds: float) -> SweepSummary:
    """What the sweep's tables hold now, per grid point; the failures among ``planned`` runs and their
    points apart."""
    runs = tables.read(store, name, "runs", columns=["status", "overrides"]).to_pandas()
    points = tables.read(store, name, "points", columns=["status", "label", "min_ratio"]).to_pandas()
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
        points_failed_planned=int(failed_points["run_id"].isin(ids).sum()) if len(failed_points) else 0,
        by_grid_point=by_grid_point(runs, points))


def by_grid_point(runs, points) -> list[dict]:
    """One row per grid point (one row in all without a grid): runs by status, points analysed and
    failed, the minimum ratio's min / median / max over the ok points, and their labels."""
    rows = []
    if not len(runs):
        return rows
    def in_order(item):  # by each key's value, numbers as numbers: width 4 before width 16
        grid = json.loads(item[0]) if item[0] else {}
        return [(k, (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)))
                for k, v in grid.items()]

    for point, part in sorted(runs.groupby(runs["overrides"].fillna("{}")), key=in_order):
        pts = points[points["run_id"].isin(part["run_id"])] if len(points) else points
        ok = pts[pts["status"] == "ok"] if len(pts) else pts
        ratio = ok["min_ratio"].dropna() if len(ok) else ok
        grid = json.loads(point) if point else {}
        rows.append({"grid": ", ".join(f"{k}={v}" for k, v in grid.items()) or "all runs",
                     "runs": len(part), "runs_ok": int((part["status"] == "ok").sum()),
                     "runs_failed": int((part["status"] == "failed").sum()),
                     "points": len(ok), "points_failed": int((pts["status"] == "failed").sum()) if len(pts) else 0,
                     "ratio": (float(ratio.min()), float(ratio.median()), float(ratio.max())) if len(ratio) else None,
                     "labels": ok["label"].value_counts().to_dict() if len(ok) else {}})
    return rows

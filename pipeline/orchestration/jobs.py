"""What one Ray task does, as plain functions: train a run, or analyse a group of checkpoints.

Tasks exchange only small descriptors; parameters travel as checkpoint files under the results root
(``<sweep>/checkpoints/<run_id>/step-<step>.pt``), so no task depends on another node's disk or on the
driver's memory. Every outcome becomes rows: an exception in a run is a ``failed`` row with its error.

A training task saves its state now and then (``<sweep>/state/<run_id>.pt``); a retry of the task (its
worker or node died, or the whole sweep was restarted) goes on from there instead of from step 0.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from operator import attrgetter
from typing import Callable, Optional

import torch

from pipeline.landscape import critical, refine
from pipeline.curvature import params
from pipeline.orchestration import rows, tables
from pipeline.orchestration.config import HessianCounting, HessianResources, RunConfig
from pipeline.curvature.hessian import spectra_at_many, spectrum_at
from pipeline.orchestration.plan import Run
from pipeline.orchestration.storage import Store, StorageFull
from pipeline.orchestration.train import Checkpoint, Curves, TrainState, limit_momentum, run_problem, train

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class CheckpointRef:
    """A checkpoint waiting for its Hessian: where it is and the run it belongs to (small, picklable: the
    refs of one run share its :class:`pipeline.orchestration.plan.Run`, and a list of them pickles its config once)."""

    run: Run
    step: int
    stage: str  # stalled | final
    path: str  # relative to the results root
    group: str  # checkpoints with equal group share one loss function and can be batched

    run_id = property(attrgetter("run.run_id"))
    seed = property(attrgetter("run.seed"))
    config = property(attrgetter("run.config"))


def checkpoint_path(sweep: str, run_id: str, step: int) -> str:
    return f"{sweep}/checkpoints/{run_id}/step-{step:09d}.pt"


def problem_group(config: RunConfig, seed: int) -> str:
    """Checkpoints whose loss functions are identical (same data, model, loss, L2, Hessian settings)."""
    data = asdict(config.data)
    if data["seed"] is None:
        data["seed"] = seed  # per-run data sets: batch only within the run
    key = {"data": data, "model": asdict(config.model), "wd": config.optim.weight_decay,
           "hessian": asdict(config.hessian)}
    if config.model.name == "torch":
        key["seed"] = seed  # a user's module is built with the run's seed: its buffers may differ by seed
    return json.dumps(key, sort_keys=True, default=str)


def save_checkpoint(store: Store, sweep: str, run: Run, ck: Checkpoint) -> CheckpointRef:
    """Write a checkpoint and then its record (:func:`record_path`), so a record always describes a
    whole file; a crash between the two leaves a checkpoint without a record, checked by loading it."""
    buf = io.BytesIO()
    torch.save({"theta": ck.theta, "step": ck.step, "loss": ck.loss, "grad_norm": ck.grad_norm,
                "stalled": ck.stalled, "reason": ck.reason, "tag": rows.stall_tag_columns(ck.tag),
                "tag_limit": rows.TAG_LIMIT, "run_id": run.run_id, "seed": run.seed}, buf)
    path = checkpoint_path(sweep, run.run_id, ck.step)
    data = buf.getvalue()
    store.write_bytes(path, data)
    record = {"file": posixpath.basename(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
              "step": ck.step, "stalled": bool(ck.stalled)}
    store.write_bytes(record_path(path), json.dumps(record, sort_keys=True).encode())
    return ref_for(run, ck.step, ck.stalled, path)


def record_path(path: str) -> str:
    """The record written beside checkpoint ``path``: ``step-<step>.pt.json`` holding its ``sha256``,
    ``bytes``, ``step`` and ``stalled``. One small file per checkpoint, written whole (atomically) once,
    so it survives a resume and needs no read-modify-write on an object store."""
    return path + RECORD_SUFFIX


RECORD_SUFFIX = ".json"


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable, or not the bytes recorded when it was written.
    The message names the file (as a URI under the results root) and what is wrong, in one line."""


def ref_for(run: Run, step: int, stalled: bool, path: str) -> CheckpointRef:
    return CheckpointRef(run, step, "stalled" if stalled else "final", path, problem_group(run.config, run.seed))


def read_record(store: Store, path: str) -> dict | None:
    """The record of checkpoint ``path``, or None where there is none (a sweep written before records
    existed, or a writer that died between the checkpoint and its record)."""
    try:
        return json.loads(store.read_bytes(record_path(path)))
    except OSError:
        if not store.exists(record_path(path)):  # object stores do not all raise FileNotFoundError
            return None
        raise
    except (ValueError, KeyError) as err:  # a damaged record: the checkpoint is then checked by loading it
        log.warning("%s: unreadable checkpoint record (%s); checking the checkpoint by loading it",
                    store.location(record_path(path)), err)
        return None


def checked_bytes(store: Store, path: str, record: dict | None = None) -> bytes:
    """The bytes of checkpoint ``path``, checked against its record (read here unless given): raises
    :class:`CheckpointError` when the file is missing or its size or SHA-256 differ from the record."""
    where = f"{store.location(path)}"
    if not store.exists(path):
        raise CheckpointError(f"checkpoint {where} is missing")
    data = store.read_bytes(path)
    record = read_record(store, path) if record is None else record
    if record is not None:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record["bytes"] or digest != record["sha256"]:
            raise CheckpointError(f"checkpoint {where} is damaged: {len(data)} bytes with sha256 {digest[:16]}…, "
                                  f"recorded {record['bytes']} bytes with sha256 {record['sha256'][:16]}…")
    return data


def load_checkpoint(store: Store, path: str) -> dict:
    """A checkpoint's contents (``theta``, ``step``, ``stalled``, …), verified (:func:`checked_bytes`)
    and loaded; any fault raises :class:`CheckpointError` naming the file."""
    data = checked_bytes(store, path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — torch raises RuntimeError, pickle errors, EOFError…
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {store.location(path)} is not readable: "
                              f"{type(err).__name__}: {first}") from None


def check_folder(store: Store, folder: str) -> tuple[dict[str, tuple[int, bool]], dict[str, str]]:
    """Verify every checkpoint under ``folder`` (one run's): ``({path: (step, stalled)} of the good ones,
    {path: one-line problem} of the others)``.

    A checkpoint with a record is checked against its size and SHA-256; one without (older sweeps) by
    loading it. A record whose checkpoint is gone is a problem too."""
    files = store.list_files(folder, ".pt")
    records = {p[: -len(RECORD_SUFFIX)] for p in store.list_files(folder, ".pt" + RECORD_SUFFIX)}
    good, problems = {}, {}
    for path in sorted(set(files) | records):
        try:
            record = read_record(store, path)
            if record is None:
                meta = load_checkpoint(store, path)
                good[path] = (int(meta["step"]), bool(meta["stalled"]))
            else:
                checked_bytes(store, path, record)
                good[path] = (int(record["step"]), bool(record["stalled"]))
        except CheckpointError as err:
            problems[path] = str(err)
    return good, problems


def scan_checkpoints(store: Store, sweep: str, run: Run) -> tuple[list[CheckpointRef], dict[str, str]]:
    """The checkpoints a run left under the results root, verified (:func:`check_folder`):
    ``(refs of the good ones, {path: one-line problem} of the others)``."""
    good, problems = check_folder(store, f"{sweep}/checkpoints/{run.run_id}")
    return [ref_for(run, step, stalled, path) for path, (step, stalled) in good.items()], problems


def existing_checkpoints(store: Store, sweep: str, run: Run) -> list[CheckpointRef]:
    """Checkpoints a finished run left that pass :func:`scan_checkpoints`' checks."""
    return scan_checkpoints(store, sweep, run)[0]


def state_path(sweep: str, run_id: str) -> str:
    return f"{sweep}/state/{run_id}.pt"


def save_state(store: Store, sweep: str, run_id: str, st: TrainState) -> None:
    buf = io.BytesIO()
    torch.save({"step": st.step, "theta": st.theta, "optimizer": st.optimizer, "generator": st.generator,
                "curves": [st.curves.step, st.curves.loss, st.curves.grad_norm, st.curves.lam_max,
                           st.curves.grad_cosine], "since": st.since,
                "checkpoints": [{**vars(ck), "tag": rows.stall_tag_columns(ck.tag)} for ck in st.checkpoints],
                "tag_limit": rows.TAG_LIMIT}, buf)
    store.write_bytes(state_path(sweep, run_id), buf.getvalue())


def load_state(store: Store, sweep: str, run_id: str, momentum: float = 0.0) -> TrainState | None:
    """The state a killed attempt of this run saved, or None. A state file that cannot be loaded (cut
    off or damaged by hand: our writers write it whole) is named in a warning and ignored, so the run
    starts again from step 0 instead of failing at every resume. ``momentum``: the run's
    :func:`pipeline.orchestration.train.limit_momentum`, for stall tags saved by an older version."""
    path = state_path(sweep, run_id)
    if not store.exists(path):
        return None
    try:
        d = torch.load(io.BytesIO(store.read_bytes(path)), map_location="cpu", weights_only=True)
        return TrainState(d["step"], d["theta"], d["optimizer"], d["generator"], Curves(*d["curves"]),
                          [Checkpoint(**{**ck, "tag": rows.stall_tag_from_columns(
                              rows.current_tag_columns(ck["tag"], d, momentum))}) for ck in d["checkpoints"]],
                          d["since"])
    except Exception as err:  # noqa: BLE001 — torch raises RuntimeError, pickle errors, EOFError…
        log.warning("training state %s is not readable (%s: %s); run %s starts again from step 0",
                    store.location(path), type(err).__name__, str(err).strip().split("\n")[0], run_id)
        return None


def restore_checkpoints(store: Store, sweep: str, run: Run, state: TrainState) -> None:
    """Re-write, from a saved training state, the checkpoints of that state whose files are missing or
    damaged (the state holds their parameters), naming each in a warning."""
    for ck in state.checkpoints:
        if read_record(store, checkpoint_path(sweep, run.run_id, ck.step)) is None:
            save_checkpoint(store, sweep, run, ck)  # the killed attempt died before writing the record
            continue
        try:
            checked_bytes(store, checkpoint_path(sweep, run.run_id, ck.step))
        except CheckpointError as err:
            log.warning("%s; re-written from the saved training state of run %s", err, run.run_id)
            save_checkpoint(store, sweep, run, ck)



def train_job(store_uri: str, sweep: str, run: Run, node_id: str | None = None,
              state_every_s: float = 60.0, device: str = "cpu") -> tuple[str, list[CheckpointRef]]:
    """Train ``run`` on ``device``, write its checkpoints, curve and ``runs`` row; return its status and
    checkpoints.

    Resumes from the state an earlier attempt saved, if any (saved on the CPU, so on any device). An
    exception inside training becomes a ``failed`` row (and no checkpoints), never a dead sweep.
    ``node_id``: the Ray node, for the row; the row's ``device`` is where the run trained.
    """
    store = Store.open(store_uri)
    t0 = time.perf_counter()
    try:
        resume = load_state(store, sweep, run.run_id, limit_momentum(run.config.optim))
        if resume is not None:
            restore_checkpoints(store, sweep, run, resume)
        # Checkpoints an earlier attempt already wrote are files already; list them again for the driver.
        refs = [ref_for(run, ck.step, ck.stalled, checkpoint_path(sweep, run.run_id, ck.step))
                for ck in (resume.checkpoints if resume else [])]
        result = train(run.config, run.seed, resume=resume, state_every_s=state_every_s, device=device,
                       on_checkpoint=lambda ck: refs.append(save_checkpoint(store, sweep, run, ck)),
                       on_state=lambda st: save_state(store, sweep, run.run_id, st))
    except StorageFull:
        raise  # no run is at fault and no row could be written: the driver stops the sweep, naming the root
    except Exception as err:  # noqa: BLE001 — any failure of one run is recorded, the sweep goes on
        tables.write(store, sweep, "runs", [rows.run_row(
            sweep, run, node_id, status="failed", wall_seconds=time.perf_counter() - t0, device=device,
            error=_error_text(err))])
        return "failed", []
    tables.write(store, sweep, "curves", rows.curve_rows(run.run_id, result.curves))
    tables.write(store, sweep, "runs", [rows.run_row(
        sweep, run, node_id, status=result.status, steps=result.steps, final_loss=result.final_loss,
        final_grad_norm=result.final_grad_norm, n_params=result.n_params,
        n_checkpoints=len(result.checkpoints), n_stalls=sum(ck.stalled for ck in result.checkpoints),
        wall_seconds=time.perf_counter() - t0, error=result.error, device=result.device,
        resumed_from_step=resume.step if resume else None)])
    if store.exists(state_path(sweep, run.run_id)):
        store.delete(state_path(sweep, run.run_id))  # the run is complete: a later attempt starts over
    return result.status, refs


def spectrum_options(h: HessianCounting) -> dict:
    """The counting options of a run's Hessian settings, as :func:`spectrum_at` takes them; full
    spectra keep what :func:`critical_values` needs of their eigenvectors (``vectors``)."""
    return {"method": h.method, "tol": h.abs_tol if h.tol_mode == "abs" else None,
            "rel_tol": h.rel_tol, "tol_mode": h.tol_mode, "gap_ratio": h.gap_ratio,
            "naive": h.naive_count, "vectors": True,
            "estimate": {"n_probes": h.estimate_probes, "degree": h.estimate_degree}}


def _hvp_operator(hvp_shards: Optional[Callable], config: RunConfig, seed: int, device: str):
    """A context giving ``matvec_at(theta)`` over ``hessian.data_workers`` data shards of the run
    ``config`` / ``seed``, or None (in-process HVPs)."""
    task: HessianResources = config.hessian_task
    if not task.data_workers:
        return contextlib.nullcontext(None)
    if hvp_shards is None:
        raise ValueError(f"hessian.data_workers={task.data_workers} needs Ray: run it through the sweep")
    return hvp_shards(lambda: run_problem(config, seed), task.data_workers, device=device,
                      dtype=config.hessian.dtype, num_cpus=task.num_cpus, num_gpus=task.num_gpus)


def hessian_job(store_uri: str, sweep: str, refs: list[CheckpointRef], device: str = "cpu",
                node_id: str | None = None, hvp_shards: Optional[Callable] = None) -> int:
    """Analyse checkpoints of one group (same loss function): write a ``points`` and a ``spectra`` row
    each. Returns how many of them failed. Failures become ``failed`` points rows: when the group's
    pass fails, each point is tried alone, so a point that cannot be analysed (say, NaN parameters) fails
    by itself with its own error. ``node_id``: the Ray node this runs on, recorded in each row.
    ``hvp_shards``: :func:`pipeline.orchestration.shards.sharded_hvp`, which ``hessian.data_workers`` > 0 needs (the
    caller has Ray)."""
    store = Store.open(store_uri)
    refs, metas, failed = _load_all(store, sweep, refs, node_id)
    if not refs:
        return failed
    config = refs[0].config
    h, task = config.hessian, config.hessian_task
    problem = run_problem(config, refs[0].seed)
    batch_size = config.data.batch_size
    subset = params.select(problem.model.segments(), h.params)

    def analyse(thetas: torch.Tensor) -> list[tuple]:
        if subset is not None and len(thetas) > 1:  # each point holds the rest of θ fixed at its own values
            return [analyse(t[None])[0] for t in thetas]

        def loss_for(dev, dtype):
            terms = problem.to(dev, dtype).batched_loss_terms(batch_size)
            return terms if subset is None else params.restrict(terms, thetas[0].to(dev, dtype), subset)
        with _hvp_operator(hvp_shards, config, refs[0].seed, device) as matvec_at:
            results, fallback = spectra_at_many(
                loss_for, thetas if subset is None else subset.take(thetas),
                dtype=h.dtype, device=device, chunk_size=task.chunk_size,
                memory_budget_mb=task.memory_budget_mb, matvec_at=matvec_at, **spectrum_options(h))
        return [(res, fallback, None) for res in results]

    def alone(theta: torch.Tensor) -> tuple:
        try:
            return analyse(theta[None])[0]
        except Exception as err:  # noqa: BLE001
            return None, None, _error_text(err)

    t0 = time.perf_counter()
    thetas = torch.stack([m["theta"] for m in metas])
    try:
        outcomes = analyse(thetas)
    except Exception as err:  # noqa: BLE001
        outcomes = [(None, None, _error_text(err))] if len(refs) == 1 else [alone(t) for t in thetas]
    per_point = (time.perf_counter() - t0) / len(refs)
    for ref, meta, (res, fallback, err) in zip(refs, metas, outcomes):
        key = rows.point_key(ref.run_id, ref.step, ref.stage, ref.seed)
        where = {"stalled": bool(meta["stalled"]), "stall_reason": meta["reason"], "node": socket.gethostname(),
                 "node_id": node_id, "seconds": per_point,
                 "param_subset": params.spec_text(h.params)}
        if res is not None:
            try:
                labels = critical_values(problem, meta["theta"], res, config.refine.gtol2, device, subset)
            except Exception as error:  # noqa: BLE001
                res, err = None, _error_text(error)
        if res is None:
            tables.write(store, sweep, "points", [rows.failed_point_row(
                key, err, **where, loss=meta["loss"], grad_norm=meta["grad_norm"])])
            failed += 1
            continue
        tag = rows.current_tag_columns(meta.get("tag", {}), meta, limit_momentum(ref.config.optim))
        _write_point(store, sweep, key, res, {**where, **tag, "fallback": fallback, **labels})
    return failed


def _load_all(store: Store, sweep: str, refs: list[CheckpointRef], node_id: str | None) -> tuple[list, list, int]:
    """Load each checkpoint of a Hessian task: ``(refs loaded, their contents, how many failed)``. One
    that is missing or damaged becomes a ``failed`` points row naming the file (the next resume re-makes
    it), and the others go on."""
    good, metas, failed = [], [], 0
    for ref in refs:
        try:
            metas.append(load_checkpoint(store, ref.path))
            good.append(ref)
        except CheckpointError as err:
            key = rows.point_key(ref.run_id, ref.step, ref.stage, ref.seed)
            tables.write(store, sweep, "points", [rows.failed_point_row(
                key, str(err), node=socket.gethostname(), node_id=node_id)])
            failed += 1
    return good, metas, failed



def _write_point(store: Store, sweep: str, key: dict, res, columns: dict) -> None:
    """An analysed point's ``points`` row (``key``, the spectrum's columns, then ``columns``) and, where the
    full spectrum was taken, its ``spectra`` row."""
    tables.write(store, sweep, "points", [{**key, **rows.spectrum_columns(res), **columns}])
    if res.eigenvalues is not None:
        tables.write(store, sweep, "spectra", [rows.spectrum_row(key, res)])


def _error_text(err: BaseException) -> str:
    """A failed row's ``error``: the exception and the traceback being handled (call inside ``except``)."""
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"


def critical_values(problem, theta: torch.Tensor, res, gtol2: float, device: str = "cpu",
                    subset: Optional[params.ParamSubset] = None) -> dict:
    """Honest-label columns at a point (pipeline.landscape.critical): gradient shares per eigenspace, the
    gradient-flat test, ``critical_label`` and the escape check. They need the gradient in the Hessian's
    eigenbasis, which the pass kept (``vectors=True``) where it took the full spectrum (``method=eigh``)
    — from the same decomposition as the counts, so ``critical_label`` and ``label`` always agree at a
    critical point; elsewhere the label says only whether the gradient is small. The loss, ‖g‖² and
    the escape check are evaluated in float64 on ``device``, the task's. ``subset``: the parameters the
    Hessian was taken over (``theta`` ``[N]`` is the whole point; the rest stays fixed), None for all.
    ``gtol2``: the run's ``refine.gtol2``, below which ‖g‖² counts as critical. With a subset the labels
    are the restricted loss's, and ``grad_norm2_all`` says whether ∇L vanishes over all of θ as well."""
    g2_all = None
    if subset is not None or res.grad_coeffs is not None:  # the loss over all of θ, in float64
        f, theta = problem.to(device, torch.float64).loss_fn(), theta.to(device, torch.float64)
        if subset is not None:
            g2_all = float(torch.func.grad(f)(theta).square().sum())
    if res.grad_coeffs is None:
        small = res.grad_norm ** 2 < gtol2
        return rows.gradient_columns(res.grad_norm ** 2, res.label if small else "not_critical", g2_all)
    if subset is not None:
        f, theta = params.SubsetLoss(f, theta, subset), subset.take(theta)
    return rows.critical_columns(critical.report_from_eigen(
        f, theta, res.eigenvalues, res.grad_coeffs, res.v_min, tol=res.tol, gtol2=gtol2), g2_all)


def refine_job(store_uri: str, sweep: str, ref: CheckpointRef, device: str = "cpu",
               node_id: str | None = None) -> int:
    """Move one checkpoint to a nearby critical point (``refine.method``), save the refined parameters
    under ``<sweep>/refined/<run_id>/``, and write its ``points`` row (``stage=refined``, with the
    ``refine_*`` columns) and its spectrum. A failure becomes a ``failed`` row. Returns 1 if it failed,
    else 0 (as :func:`hessian_job` counts its failed points)."""
    store = Store.open(store_uri)
    r, h = ref.config.refine, ref.config.hessian
    key = rows.point_key(ref.run_id, ref.step, "refined", ref.seed)
    where = {"node": socket.gethostname(), "node_id": node_id, "refine_method": r.method,
             "param_subset": params.spec_text(h.params)}
    t0 = time.perf_counter()
    try:
        meta = load_checkpoint(store, ref.path)
        problem = run_problem(ref.config, ref.seed).to(device, torch.float64)
        f, start = problem.loss_fn(), meta["theta"].to(device, torch.float64)
        subset = params.select(problem.model.segments(), h.params)
        if subset is not None:  # refine over the subset too, the rest held at the checkpoint's values
            f, start = params.SubsetLoss(f, start, subset), subset.take(start)
        found = refine.refine(r.method, f, start, **refine.options_for(r.method, r, h))
        full = found.theta if subset is None else subset.put(f.base, found.theta)
        buf = io.BytesIO()
        torch.save({"theta": full.cpu(), "step": ref.step, "start": ref.path, **rows.refine_columns(found)}, buf)
        store.write_bytes(f"{sweep}/refined/{ref.run_id}/step-{ref.step:09d}.pt", buf.getvalue())
        res = spectrum_at(f, found.theta, **spectrum_options(h))
        columns = {**where, **rows.refine_columns(found), "stalled": bool(meta["stalled"]),
                   "stall_reason": meta["reason"], "seconds": time.perf_counter() - t0,
                   **critical_values(problem, full, res, r.gtol2, device, subset)}
    except StorageFull:
        raise  # as in train_job: the sweep stops
    except Exception as err:  # noqa: BLE001
        tables.write(store, sweep, "points", [rows.failed_point_row(
            key, _error_text(err), **where, seconds=time.perf_counter() - t0)])
        return 1
    _write_point(store, sweep, key, res, columns)
    return 0

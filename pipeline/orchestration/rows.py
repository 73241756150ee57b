"""Rows of the results tables (:mod:`pipeline.orchestration.tables` declares their schemas) from the pipeline's records.

Every column name a row carries is written here, from a typed record: a run and its training result
(``runs``, ``curves``), a :class:`pipeline.curvature.hessian.SpectrumResult` (its :class:`pipeline.curvature.spectrum.Summary`
of counts, tolerance and extreme eigenvalues), a :class:`pipeline.landscape.stall.StallTag`, a
:class:`pipeline.landscape.critical.CriticalReport` and a :class:`pipeline.landscape.refine_result.RefineResult` (``points``,
``spectra``). The tasks (:mod:`pipeline.orchestration.jobs`) and the driver (:mod:`pipeline.orchestration.sweep`) only choose which rows
to write.
"""
from __future__ import annotations

import json
import math
import socket
from typing import Optional

import numpy as np

from pipeline.orchestration import tables
from pipeline.landscape.critical import CriticalReport, EscapeCheck
from pipeline.curvature.hessian import SpectrumResult
from pipeline.orchestration.plan import Run
from pipeline.landscape.refine_result import RefineResult
from pipeline.landscape.stall import StallTag


def run_row(sweep: str, run: Run, node_id: Optional[str] = None, **values) -> dict:
    """A ``runs`` row: the run's identity, grid point and config columns, then ``values`` (status,
    ``TrainResult`` fields, error …) as the caller measured them."""
    row = {"run_id": run.run_id, "sweep": sweep, "seed": run.seed, "node": socket.gethostname(),
           "node_id": node_id,
           "overrides": json.dumps(run.overrides, sort_keys=True, default=str),
           "config_json": json.dumps(run.config.sections(), sort_keys=True, default=str)}
    row.update(tables.config_columns(run.config.sections()))
    row.update(values)
    return row


def curve_rows(run_id: str, curves) -> list[dict]:
    """The ``curves`` rows of a run's :class:`pipeline.orchestration.train.Curves`, one per logged step."""
    c = curves
    return [{"run_id": run_id, "step": s, "loss": v, "grad_norm": g, "lam_max": lam, "grad_cosine": cos}
            for s, v, g, lam, cos in zip(c.step, c.loss, c.grad_norm, c.lam_max, c.grad_cosine)]


def point_key(run_id: str, step: int, stage: str, seed: int) -> dict:
    """The key columns every ``points`` row starts with."""
    return {"run_id": run_id, "step": step, "stage": stage, "seed": seed}


def failed_point_row(key: dict, error: str, **values) -> dict:
    """A ``points`` row for a point that could not be analysed: its key, the error, what is known."""
    return {**key, "status": "failed", "error": error, **values}


def spectrum_columns(res: SpectrumResult) -> dict:
    """The ``points`` columns of a :class:`pipeline.curvature.hessian.SpectrumResult`: counts with their tolerance,
    ratios, label, timings and, for ``method=estimate``, the intervals."""
    s = res.summary
    return {"status": "ok", "loss": res.loss, "grad_norm": res.grad_norm, "n_params": res.n_params,
            "n_pos": s.counts.n_pos, "n_neg": s.counts.n_neg, "n_zero": s.counts.n_zero,
            "n_pos_naive": s.counts.n_pos_naive,
            "min_ratio": res.min_ratio, "min_ratio_naive": res.min_ratio_naive,
            "min_ratio_curved": res.min_ratio_curved, "index": res.index, "label": res.label,
            "lam_min": s.lam_min, "lam_max": s.lam_max, "tol": s.tol, "tol_method": s.tol_method,
            "method": res.method, "hvp": res.hvp, "dtype": res.dtype, "device": res.device,
            "build_seconds": res.seconds.get("build"), "count_seconds": res.seconds.get("count"),
            **estimate_columns(res.estimate)}


def estimate_columns(est: Optional[dict]) -> dict:
    """Interval columns of a ``method=estimate`` result (none otherwise)."""
    if est is None:
        return {}
    return {"n_pos_lo": est["n_pos_ci"][0], "n_pos_hi": est["n_pos_ci"][1], "n_neg_lo": est["n_neg_ci"][0],
            "n_neg_hi": est["n_neg_ci"][1], "n_zero_lo": est["n_zero_ci"][0], "n_zero_hi": est["n_zero_ci"][1],
            "min_ratio_lo": est["min_ratio_ci"][0], "min_ratio_hi": est["min_ratio_ci"][1],
            "estimate_resolution": est["resolution"], "estimate_degree": est["degree"],
            "estimate_probes": est["n_probes"], "estimate_confidence": est["confidence"]}


def spectrum_row(key: dict, res: SpectrumResult) -> dict:
    """The ``spectra`` row of a point whose full spectrum was taken."""
    return {"run_id": key["run_id"], "step": key["step"], "stage": key["stage"], "n_params": res.n_params,
            "eigenvalues": np.asarray(res.eigenvalues).tolist()}


def stall_tag_columns(tag: Optional[StallTag]) -> dict:
    """The ``stall_*`` columns of a stalled (or final) checkpoint's tag (none without a tag). Checkpoint
    files keep the tag in this form."""
    if tag is None:
        return {}
    return {"stall_tag": tag.tag, "stall_grad_ratio": tag.grad_ratio, "stall_cosine": tag.cosine,
            "stall_sharpness": tag.sharpness, "stall_tag_reasons": tag.reasons}


# Written beside every saved stall tag (checkpoints, training states) since schema version 10, whose
# stall_sharpness is λmax·lr/(2(1 + μ)); a tag saved without it holds λmax·lr/2.
TAG_LIMIT = "2(1+momentum)/lr"


def current_tag_columns(columns: dict, saved: dict, momentum: float) -> dict:
    """Stall-tag ``columns`` read from ``saved`` (a checkpoint's or training state's contents) as schema
    version 10 defines them: a tag saved before it (no :data:`TAG_LIMIT` in ``saved``) measured its
    sharpness against 2/lr, so a run with momentum μ (:func:`pipeline.orchestration.train.limit_momentum`)
    gets it rescaled by 1/(1 + μ)."""
    if not columns or not momentum or saved.get("tag_limit") == TAG_LIMIT:
        return columns
    return {**columns, "stall_sharpness": columns["stall_sharpness"] / (1.0 + momentum)}


def stall_tag_from_columns(columns: dict) -> Optional[StallTag]:
    """The :class:`pipeline.landscape.stall.StallTag` that :func:`stall_tag_columns` wrote (None for ``{}``)."""
    if not columns:
        return None
    return StallTag(columns["stall_tag"], columns["stall_grad_ratio"], columns["stall_cosine"],
                    columns["stall_sharpness"], columns["stall_tag_reasons"])


def escape_columns(escape: Optional[EscapeCheck]) -> dict:
    """Scalar summary of an escape check: the step with the largest drop, its change and the prediction
    there (nulls where no check was made)."""
    if escape is None:
        return {"escape_drops": None, "escape_step": math.nan, "escape_delta": math.nan,
                "escape_predicted": math.nan, "escape_ratio_smallest": math.nan}
    i = int(np.argmin(escape.delta))
    return {"escape_drops": escape.drops, "escape_step": escape.steps[i], "escape_delta": escape.delta[i],
            "escape_predicted": escape.predicted[i], "escape_ratio_smallest": escape.ratio_smallest}


def critical_columns(report: CriticalReport, grad_norm2_all: Optional[float] = None) -> dict:
    """The honest-label columns of a :class:`pipeline.landscape.critical.CriticalReport`; ``grad_norm2_all``:
    ‖∇L‖² over all of θ where the report is of a parameter subset's loss (None: the report's own)."""
    return {"grad_norm2": report.grad_norm2, "critical_label": report.label,
            "grad_norm2_all": report.grad_norm2 if grad_norm2_all is None else grad_norm2_all,
            "grad_share_neg": report.shares.neg, "grad_share_zero": report.shares.zero,
            "grad_share_pos": report.shares.pos, "flat_residual": report.flatness.relative_residual,
            "flat_cokernel": report.flatness.cokernel_residual, "grad_curvature": report.grad_curvature,
            **escape_columns(report.escape)}


def refine_columns(result: RefineResult) -> dict:
    """The ``refine_*`` columns of a refinement's outcome."""
    return {"refine_method": result.method, "refine_iterations": result.iterations,
            "refine_stopped_because": result.stopped_because, "refine_distance": result.distance,
            "refine_loss_change": result.loss_change, "refine_grad_norm2_start": result.grad_norm2_0,
            "refine_grad_norm2": result.grad_norm2, "refine_relative_residual": result.relative_residual,
            "refine_cokernel_residual": result.cokernel_residual, "refine_hvps": result.hvps,
            "refine_grads": result.grads, "refine_seconds": result.seconds}


def gradient_columns(grad_norm2: float, critical_label: str, grad_norm2_all: Optional[float] = None) -> dict:
    """The honest-label columns where no eigenbasis was kept: only ‖g‖² and the label it allows
    (``grad_norm2_all`` as in :func:`critical_columns`)."""
    return {"grad_norm2": grad_norm2, "critical_label": critical_label,
            "grad_norm2_all": grad_norm2 if grad_norm2_all is None else grad_norm2_all}

"""Stage 5 — training: one run from its config and seed, until it stalls ``max_stalls`` times or reaches
``max_steps``. Plain PyTorch; the caller decides what to do with checkpoints (the Ray job writes them).

Every ``log_every`` steps the full-batch loss and the norm of its gradient are recorded; the stall rule
(:mod:`pipeline.landscape.stall`) reads that history. A stall yields a :class:`Checkpoint` of the parameters at that
step; the last state is a checkpoint too, marked ``stalled=False`` unless the run ended on a stall.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pipeline.landscape import stall
from pipeline.curvature.problem import DTYPES, MeanLoss, Problem, make_problem  # noqa: F401  (MeanLoss, Problem: their old home)

OPTIMIZERS = ("gd", "sgd", "adam")  # optim.name: what _optimizer builds


@dataclass
class Checkpoint:
    step: int
    theta: torch.Tensor  # [n_params], CPU
    loss: float  # full-batch training loss at this step
    grad_norm: float  # ‖∇L‖ of the full-batch loss
    stalled: bool  # True: the stall rule fired here; False: the run's last state without a stall
    reason: str  # why this point was saved, e.g. "stall: rel. improvement 3e-05 < 1e-4 over 500 steps"
    tag: Optional[stall.StallTag] = None  # why it stalled (small gradient or oscillating), measured at the point


@dataclass
class Curves:
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    lam_max: list = field(default_factory=list)  # λmax by power iteration (NaN where not measured)
    grad_cosine: list = field(default_factory=list)  # cos∠(∇L(θ), ∇L(θ − lr·∇L(θ))) (NaN where not measured)


@dataclass
class TrainResult:
    status: str  # ok | diverged
    steps: int
    final_loss: float
    final_grad_norm: float
    n_params: int
    curves: Curves
    checkpoints: list
    seconds: float
    error: Optional[str] = None
    device: str = "cpu"  # where it trained, as torch names it (cpu, cuda:0)


@dataclass
class TrainState:
    """Everything :func:`train` needs to go on from ``step`` exactly as if it had never stopped
    (a retried task resumes from it). Saved after the optimizer step of a logged step. Its tensors are
    on the CPU whatever the training device, so a run may resume on another device."""

    step: int  # the next step to take
    theta: torch.Tensor  # [n_params], CPU
    optimizer: dict  # torch optimizer state_dict (momentum buffers, Adam moments), CPU tensors
    generator: torch.Tensor  # state of the mini-batch sampler's RNG
    curves: Curves
    checkpoints: list  # Checkpoint objects emitted so far
    since: int  # step of the last stall (the stall window restarts there)


def run_problem(cfg, seed: int) -> Problem:
    """The model, data set and loss of a run (``cfg``: its RunConfig; read are ``data``, ``model`` and
    ``optim.weight_decay``), as built, on the CPU."""
    return make_problem(cfg.data, cfg.model, seed, cfg.optim.weight_decay)


def _optimizer(cfg, theta: torch.Tensor) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name in ("gd", "sgd"):
        return torch.optim.SGD([theta], lr=o.lr, momentum=o.momentum)
    if o.name == "adam":
        return torch.optim.Adam([theta], lr=o.lr)
    raise ValueError(f"unknown optim.name {o.name!r}: expected one of {', '.join(OPTIMIZERS)}")


def limit_momentum(optim) -> float:
    """The heavy-ball μ in (S)GD's stability limit 2(1 + μ)/lr, against which a stall's sharpness is
    measured; 0 for Adam, whose sharpness is not measured."""
    return 0.0 if optim.name == "adam" else float(optim.momentum)


def train(cfg, seed: int, *, theta0: Optional[torch.Tensor] = None,
          on_checkpoint: Optional[Callable[[Checkpoint], None]] = None,
          resume: Optional[TrainState] = None, on_state: Optional[Callable[[TrainState], None]] = None,
          state_every_s: float = 60.0, device: str = "cpu") -> TrainResult:
    """Train one run. ``cfg``: its :class:`pipeline.orchestration.config.RunConfig` (read are its ``data``,
    ``model``, ``optim`` and ``stall`` sections, as attributes; a composed config's nodes serve as well).

    Deterministic given (cfg, seed): initial parameters come from ``seed``, mini-batch order too.
    ``on_checkpoint`` is called with each checkpoint as soon as it exists, so its Hessian can start
    while training goes on. ``on_state`` receives a :class:`TrainState` at most every ``state_every_s``
    seconds; passing one back as ``resume`` continues that run with the same result.
    ``device``: where the problem's tensors, θ and the optimizer state live (``cuda`` for a GPU); the
    mini-batch sampler stays on the CPU, so a run draws the same batches on every device, and what
    leaves the loop (checkpoints, states) is on the CPU.

    The step loop stays in one piece on purpose: the order of measuring, logging, the stall check, the
    step and the state save within a step is what makes a resumed run bit-for-bit the uninterrupted one.
    """
    t_start = time.perf_counter()
    dtype = DTYPES[cfg.optim.dtype]
    problem = run_problem(cfg, seed).to(device, dtype)
    model, data = problem.model, problem.data
    start = theta0 if resume is None else resume.theta
    theta = (model.init(seed, dtype) if start is None else start).to(device, dtype, copy=True).requires_grad_(True)
    opt = _optimizer(cfg, theta)
    full = problem.loss_fn()
    o, s = cfg.optim, cfg.stall
    gen = torch.Generator().manual_seed(int(seed) + 1)
    mini = cfg.data.batch_size > 0 and cfg.data.batch_size < data.n
    curves, checkpoints = Curves(), []
    since, status, step, first = 0, "ok", 0, 0
    if resume is not None:  # go on exactly where the saved state left off
        opt.load_state_dict(resume.optimizer)  # moves its tensors to theta's device
        gen.set_state(resume.generator)
        curves, checkpoints, since, first = resume.curves, list(resume.checkpoints), resume.since, resume.step
    # Mini-batch steps only refresh these at logged steps; a resumed run starts from the last logged values.
    loss_now, gnorm_now = (curves.loss[-1], curves.grad_norm[-1]) if curves.step else (math.nan, math.nan)
    last_state = time.perf_counter()

    lr = None if o.name == "adam" else float(o.lr)  # Adam has no 2/lr stability limit
    thresholds = dict(grad_ratio_tol=s.grad_ratio_tol, cosine_tol=s.cosine_tol, sharpness_tol=s.sharpness_tol,
                      momentum=limit_momentum(o))
    power_v = None  # warm start of the power iteration between curvature measurements

    def emit(ck: Checkpoint):
        # Oscillating or small gradient? Measured at the point itself (one extra gradient, a power iteration).
        g0 = curves.grad_norm[0] if curves.grad_norm else ck.grad_norm
        ck.tag = stall.stall_tag_at(full, ck.theta.to(device, dtype), g0, lr, power_iters=s.power_iters, **thresholds)
        checkpoints.append(ck)
        if on_checkpoint is not None:
            on_checkpoint(ck)

    for step in range(first, o.max_steps + 1):
        logging = step % o.log_every == 0 or step == o.max_steps
        if not mini or logging:
            loss_now, gnorm = _full_batch(full, theta, opt, logging)
            gnorm_now = gnorm if logging else gnorm_now
        if not math.isfinite(loss_now):
            status = "diverged"
            break
        if logging:
            curves.step.append(step)
            curves.loss.append(loss_now)
            curves.grad_norm.append(gnorm_now)
            lam, cos = math.nan, math.nan
            if s.curvature_every and step % s.curvature_every == 0:
                lam, cos, power_v = _curvature(full, theta.detach(), s.power_iters, lr, power_v)
            curves.lam_max.append(lam)
            curves.grad_cosine.append(cos)
            if stall.is_stalled(curves.step, curves.loss, s.window, s.threshold, since=since):
                ref = _loss_at(curves, step - s.window)
                rel = stall.relative_improvement(ref, loss_now)
                emit(Checkpoint(step, _cpu(theta.detach()), loss_now, gnorm_now, True,
                                f"stall: relative improvement {rel:.4g} < {s.threshold:g} over {s.window} steps"))
                since = step
                if len(checkpoints) >= s.max_stalls:
                    break
        if step == o.max_steps:
            break
        if mini:
            idx = torch.randperm(data.n, generator=gen)[: cfg.data.batch_size].to(data.X.device)
            opt.zero_grad(set_to_none=True)
            problem.loss_fn(data.X[idx], data.Y[idx])(theta).backward()
        opt.step()
        if on_state is not None and logging and time.perf_counter() - last_state >= state_every_s:
            on_state(TrainState(step + 1, _cpu(theta.detach()), _cpu(opt.state_dict()),
                                gen.get_state(), copy.deepcopy(curves), list(checkpoints), since))
            last_state = time.perf_counter()

    if status == "ok" and (not checkpoints or checkpoints[-1].step != step):
        emit(Checkpoint(step, _cpu(theta.detach()), loss_now, gnorm_now, False,
                        f"final: reached optim.max_steps={o.max_steps}" if step == o.max_steps
                        else "final"))
    return TrainResult(status, step, loss_now, gnorm_now, model.n_params, curves, checkpoints,
                       time.perf_counter() - t_start,
                       error=f"loss became {loss_now} at step {step}" if status == "diverged" else None,
                       device=str(theta.device))


def _cpu(obj):
    """A copy of ``obj`` (a tensor, or dicts and lists of them: an optimizer's state_dict) with every tensor
    on the CPU: what the loop hands out must not alias the live parameters or pin a GPU's memory."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _full_batch(full, theta: torch.Tensor, opt: torch.optim.Optimizer, logging: bool) -> tuple[float, float]:
    """The full-batch loss at ``theta`` with its gradient left in ``theta.grad`` (the step of full-batch GD
    uses it), and ‖∇L‖ at logged steps (NaN otherwise: reading it costs a device sync)."""
    opt.zero_grad(set_to_none=True)
    value = full(theta)
    value.backward()
    return float(value.detach()), float(theta.grad.norm()) if logging else math.nan


def _curvature(full, point: torch.Tensor, power_iters: int, lr: Optional[float], power_v: Optional[torch.Tensor]
               ) -> tuple[float, float, torch.Tensor]:
    """λmax at ``point`` by power iteration (warm-started from ``power_v``) and, for (S)GD, the cosine between
    the gradient and the one after a GD step (NaN for Adam); returns them and the new warm start."""
    power = stall.power_lambda_max(full, point, power_iters, v0=power_v)
    cos = math.nan
    if lr is not None:
        g_fn = torch.func.grad(full)
        g = g_fn(point)
        cos = stall.gradient_cosine(g, g_fn(point - lr * g))
    return power.lam_max, cos, power.vector


def _loss_at(curves: Curves, step: int) -> float:
    """Loss of the latest recorded entry at or before ``step``."""
    best = curves.loss[0]
    for s, loss in zip(curves.step, curves.loss):
        if s > step:
            break
        best = loss
    return best

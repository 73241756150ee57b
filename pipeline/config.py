"""Stage 1 — configuration: typed schemas, registered in Hydra's ConfigStore, and loud validation.

The dataclasses are the single source of truth for what a sweep may say. Hydra merges the YAML files
under ``conf/`` onto them, so an unknown key fails at composition time; :func:`validate` then checks
values and ranges before any run starts, and names the field and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError

from pipeline.spectrum import TOL_MODES

DATA_NAMES = ("synthetic", "digits", "gaussian")
MODEL_NAMES = ("mlp", "cnn")
ACTIVATIONS = ("tanh", "softplus", "relu", "swish", "linear")
LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("gd", "sgd", "adam")
DTYPES = ("float32", "float64")
HESSIAN_METHODS = ("auto", "eigh", "inertia", "estimate")
# The hessian keys that change what a run computes, so enter its id (pipeline.plan.run_id) and may vary
# over a sweep's grid; the rest (resources, batching, estimator settings) are shared by the whole sweep.
HESSIAN_ID_KEYS = ("method", "dtype", "tol_mode", "rel_tol", "abs_tol", "gap_ratio")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and what is allowed."""


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | digits | gaussian
    seed: Optional[int] = 0  # seed of the data set; null = each run's own seed (a new data set per run)
    n_samples: int = 256  # synthetic/gaussian: samples drawn; digits: first n (0 = all 1,797)
    n_features: int = 4  # synthetic/gaussian input dimension (digits: 64, or side² when downsampled)
    n_outputs: int = 1  # synthetic/gaussian target dimension (digits: 10 classes)
    teacher_width: int = 8  # hidden width of the random tanh teacher that labels synthetic inputs
    noise: float = 0.0  # std of Gaussian label noise added to synthetic targets
    side: int = 8  # digits: image side after downsampling (8 = original, 4 = 4×4 block means)
    batch_size: int = 0  # 0 = full batch (for training, and for Hessian accumulation)
    standardize: bool = True


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | cnn (cnn: image data, data.name=digits)
    depth: int = 1  # number of hidden layers (cnn: hidden dense layers after the convolutions)
    width: int = 8
    activation: str = "tanh"
    bias: bool = True
    loss: str = "mse"  # mse | cross_entropy (cross_entropy needs a classification data set)
    # cnn only (an MLP ignores them, and they do not enter an MLP run's id):
    conv_layers: int = 2  # convolutions before the dense head
    channels: int = 4  # channels of every convolution
    kernel: int = 3  # kernel side, odd: zero padding of kernel // 2 keeps the image size


@dataclass
class OptimConfig:
    name: str = "gd"  # gd (full batch) | sgd (mini-batch, data.batch_size) | adam
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0  # L2 penalty λ/2·‖θ‖² added to the loss (and to its Hessian)
    max_steps: int = 3000
    log_every: int = 10  # record full-batch loss and gradient norm every k steps
    dtype: str = "float64"


@dataclass
class StallConfig:
    window: int = 500  # steps over which the relative improvement is measured
    threshold: float = 1e-4  # stall when (L[t-window] - L[t]) / |L[t-window]| < threshold
    max_stalls: int = 1  # stop a run after this many stalls (it also stops at optim.max_steps)
    # Stall tags (oscillating vs small_gradient) — see pipeline.critical.stall_tag:
    grad_ratio_tol: float = 1e-2  # oscillating when ‖g‖/‖g₀‖ ≥ this
    cosine_tol: float = 0.0  # … or when successive gradients have cosine < this
    sharpness_tol: float = 0.9  # λmax·lr/2 ≥ this is reported (edge of stability), never a tag on its own
    power_iters: int = 50  # power-iteration steps for λmax (at stalls, and in curves)
    curvature_every: int = 0  # log λmax and the gradient cosine in `curves` every k steps; 0 = off


@dataclass
class HessianConfig:
    method: str = "auto"  # auto | eigh | inertia | estimate
    dtype: str = "float64"
    tol_mode: str = "auto"  # auto (eigh: gap, else rel; inertia: rel) | gap (eigh and inertia alike) | rel | abs
    rel_tol: float = 1e-6  # tol = rel_tol · max|λ| when no clear gap
    abs_tol: float = 0.0  # used when tol_mode = abs
    gap_ratio: float = 1e4  # a "clear gap": consecutive |λ| differ by at least this factor
    num_gpus: float = 0.0  # GPUs per Hessian task (fractional allowed); 0 = CPU
    num_cpus: float = 1.0
    chunk_size: int = 0  # Hessian columns built per vmap call; 0 = derived from memory_budget_mb
    memory_budget_mb: float = 0.0  # 0 = a share of free device memory
    batch_checkpoints: int = 8  # checkpoints of one architecture analysed per task
    estimate_probes: int = 30  # method=estimate: Rademacher probes of the stochastic trace
    estimate_degree: int = 0  # method=estimate: Chebyshev degree; 0 = the least that resolves tol
    naive_count: bool = True  # inertia: a third LDLᵀ (of H itself) for the naive #{λ > 0}; false skips it
    data_workers: int = 0  # method=estimate: Ray actors that split the data for HVPs (0 = in the task)


@dataclass
class RefineConfig:
    method: str = "none"  # none | newton_mr | gnm | newton_eig: move each stalled point to a nearby critical point
    gtol2: float = 1e-10  # converged when ‖g‖² < gtol2; also the "critical" threshold of every label
    max_iters: int = 100  # Newton steps (gnm: descent steps)
    inner_max_iters: int = 500  # MINRES iterations per Newton step
    inner_rtol: float = 1e-10
    forcing: float = 0.1  # inexact Newton: MINRES tolerance min(forcing, max(inner_rtol, ‖g‖^½))
    rcond: float = 1e-10
    operator: str = "auto"  # auto | hvp | dense (pipeline.refine.resolve_operator)
    damping: float = 1e-3  # newton_eig: starting Levenberg–Marquardt damping, relative to max|λ|
    min_damping: float = 1e-14  # newton_eig: its floor, relative to max|λ|
    max_tries: int = 30  # newton_eig: trial steps per eigendecomposition
    patience: int = 10  # newton_eig: Newton steps that must cut ‖g‖² by `progress` before descent steps help
    progress: float = 10.0
    continuation: bool = True  # newton_eig: saddle-free descent steps through slow stretches
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class SweepConfig:
    name: str = "default"
    seeds: Any = 8  # a count (seeds 0..n-1) or an explicit list of ints
    grid: dict = field(default_factory=dict)  # dotted key -> list of values, crossed with seeds
    max_in_flight: int = 0  # tasks in flight at once; 0 = 2 × cluster CPUs
    progress: str = "auto"  # auto | live | plain | none


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start a local Ray; "auto", "host:port" or "ray://…"
    num_cpus: Optional[int] = None  # local Ray only: CPUs to offer (None = all)
    train_num_cpus: float = 1.0  # CPUs per training task
    max_retries: int = 3  # Ray retries of a task whose worker died
    state_every_s: float = 60.0  # seconds between saves of a training task's state; a retry resumes there
    runtime_env: dict = field(default_factory=dict)


@dataclass
class PlotConfig:
    hue: str = ""  # a config key (e.g. model.width) whose value colours the minimum-ratio figure; "" = label
    full_range: bool = False  # minimum-ratio axes from 0 to 1 instead of the data's range


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    stall: StallConfig = MISSING
    hessian: HessianConfig = MISSING
    refine: RefineConfig = MISSING
    sweep: SweepConfig = MISSING
    ray: RayConfig = MISSING
    results_root: str = "results"
    figures: bool = True
    plot: PlotConfig = field(default_factory=PlotConfig)  # how minratio-sweep draws its figures


def register_configs() -> None:
    """Register the schemas so that ``conf/*.yaml`` are merged onto (and checked against) them."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [("data", DataConfig), ("model", ModelConfig), ("optim", OptimConfig),
                        ("stall", StallConfig), ("hessian", HessianConfig), ("refine", RefineConfig),
                        ("sweep", SweepConfig),
                        ("ray", RayConfig)]:
        cs.store(group=group, name=f"base_{group}", node=node)


def _require(cond: bool, field_name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is not allowed: expected {allowed}")


def _one_of(cfg: DictConfig, key: str, allowed: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in allowed, key, value, "one of " + ", ".join(allowed))


def section(config: dict, name: str) -> dict:
    """Section ``name`` of a run's resolved config dict, with the schema's defaults for any key it lacks —
    a config composed by an older minratio (a task running newer code than its driver) still works."""
    schema = {"hessian": HessianConfig, "refine": RefineConfig}[name]
    return {**dataclasses.asdict(schema()), **config.get(name, {})}


def seeds_of(seeds: Any) -> list[int]:
    """``sweep.seeds`` as a list: a count n gives 0..n-1; a list is taken as is (ints ≥ 0, no repeats)."""
    if OmegaConf.is_list(seeds) or isinstance(seeds, (list, tuple)):
        out = list(seeds)
        _require(len(out) >= 1, "sweep.seeds", out, "a non-empty list of ints or a count ≥ 1")
        for s in out:
            _require(isinstance(s, int) and not isinstance(s, bool) and s >= 0,
                     "sweep.seeds", out, "ints ≥ 0")
        _require(len(set(out)) == len(out), "sweep.seeds", out, "distinct seeds")
        return out
    _require(isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1,
             "sweep.seeds", seeds, "a count ≥ 1 or a list of ints")
    return list(range(seeds))


def validate(cfg: DictConfig) -> None:
    """Check every value of a composed config; raise :class:`ConfigError` naming the first bad field."""
    _one_of(cfg, "data.name", DATA_NAMES)
    _one_of(cfg, "model.name", MODEL_NAMES)
    _one_of(cfg, "model.activation", ACTIVATIONS)
    _one_of(cfg, "model.loss", LOSSES)
    _one_of(cfg, "optim.name", OPTIMIZERS)
    _one_of(cfg, "optim.dtype", DTYPES)
    _one_of(cfg, "hessian.method", HESSIAN_METHODS)
    _one_of(cfg, "hessian.dtype", DTYPES)
    _one_of(cfg, "hessian.tol_mode", TOL_MODES)
    _one_of(cfg, "sweep.progress", ("auto", "live", "plain", "none"))
    d, m, o, s, h = cfg.data, cfg.model, cfg.optim, cfg.stall, cfg.hessian
    _require(d.n_samples >= 0 if d.name == "digits" else d.n_samples >= 1, "data.n_samples", d.n_samples,
             "≥ 1 (digits: 0 = all)")
    _require(d.seed is None or d.seed >= 0, "data.seed", d.seed, "null or an int ≥ 0")
    _require(d.name != "digits" or d.n_samples <= 1797, "data.n_samples", d.n_samples,
             "≤ 1797 for data.name=digits (0 = all 1,797)")
    _require(d.n_features >= 1, "data.n_features", d.n_features, "≥ 1")
    _require(d.n_outputs >= 1, "data.n_outputs", d.n_outputs, "≥ 1")
    _require(d.teacher_width >= 1, "data.teacher_width", d.teacher_width, "≥ 1")
    _require(d.noise >= 0, "data.noise", d.noise, "≥ 0")
    _require(d.side in (2, 4, 8), "data.side", d.side, "2, 4 or 8")
    _require(d.batch_size >= 0, "data.batch_size", d.batch_size, "≥ 0 (0 = full batch)")
    _require(m.depth >= 0, "model.depth", m.depth, "≥ 0 hidden layers")
    _require(m.width >= 1, "model.width", m.width, "≥ 1")
    if m.name == "cnn":
        _require(d.name == "digits", "data.name", d.name, "digits with model.name=cnn (a CNN needs images)")
        _require(m.conv_layers >= 1, "model.conv_layers", m.conv_layers, "≥ 1")
        _require(m.channels >= 1, "model.channels", m.channels, "≥ 1")
        _require(m.kernel >= 1 and m.kernel % 2 == 1, "model.kernel", m.kernel,
                 "an odd size ≥ 1 (same padding needs a centre)")
        # A wider kernel has weights that never meet a pixel: exact zero rows of the Hessian.
        _require(m.kernel <= 2 * d.side - 1, "model.kernel", m.kernel,
                 f"≤ {2 * d.side - 1} = 2·data.side − 1 (data.side={d.side})")
    _require(not (m.loss == "cross_entropy" and d.name != "digits"), "model.loss", m.loss,
             "mse for regression data (cross_entropy needs data.name=digits)")
    _require(o.lr > 0, "optim.lr", o.lr, "> 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "≥ 0")
    _require(o.max_steps >= 1, "optim.max_steps", o.max_steps, "≥ 1")
    _require(o.log_every >= 1, "optim.log_every", o.log_every, "≥ 1")
    _require(not (o.name == "sgd" and d.batch_size == 0), "data.batch_size", d.batch_size,
             "≥ 1 with optim.name=sgd (mini-batch)")
    _require(s.window >= o.log_every, "stall.window", s.window, f"≥ optim.log_every ({o.log_every})")
    _require(s.threshold > 0, "stall.threshold", s.threshold, "> 0")
    _require(s.max_stalls >= 1, "stall.max_stalls", s.max_stalls, "≥ 1")
    _require(s.grad_ratio_tol > 0, "stall.grad_ratio_tol", s.grad_ratio_tol, "> 0")
    _require(s.power_iters >= 1, "stall.power_iters", s.power_iters, "≥ 1")
    _require(s.curvature_every >= 0, "stall.curvature_every", s.curvature_every, "≥ 0 (0 = off)")
    r = cfg.refine
    _one_of(cfg, "refine.method", ("none", "newton_mr", "gnm", "newton_eig"))
    _one_of(cfg, "refine.operator", ("auto", "hvp", "dense"))
    _require(r.gtol2 > 0, "refine.gtol2", r.gtol2, "> 0")
    _require(r.max_iters >= 1, "refine.max_iters", r.max_iters, "≥ 1")
    _require(r.inner_max_iters >= 1, "refine.inner_max_iters", r.inner_max_iters, "≥ 1")
    _require(r.damping > 0, "refine.damping", r.damping, "> 0")
    _require(r.min_damping > 0, "refine.min_damping", r.min_damping, "> 0")
    _require(r.max_tries >= 1, "refine.max_tries", r.max_tries, "≥ 1")
    _require(r.patience >= 1, "refine.patience", r.patience, "≥ 1")
    _require(r.progress > 1, "refine.progress", r.progress, "> 1")
    _require(0 < r.forcing < 1, "refine.forcing", r.forcing, "in (0, 1)")
    _require(r.num_cpus > 0, "refine.num_cpus", r.num_cpus, "> 0")
    _require(r.num_gpus >= 0, "refine.num_gpus", r.num_gpus, "≥ 0")
    _require(r.num_gpus <= 1 or float(r.num_gpus).is_integer(), "refine.num_gpus", r.num_gpus,
             "a fraction ≤ 1 or a whole number")
    _require(0 <= h.rel_tol < 1, "hessian.rel_tol", h.rel_tol, "in [0, 1)")
    _require(h.abs_tol >= 0, "hessian.abs_tol", h.abs_tol, "≥ 0")
    _require(h.gap_ratio > 1, "hessian.gap_ratio", h.gap_ratio, "> 1")
    _require(h.num_gpus >= 0, "hessian.num_gpus", h.num_gpus, "≥ 0")
    _require(h.num_cpus > 0, "hessian.num_cpus", h.num_cpus, "> 0")
    _require(h.chunk_size >= 0, "hessian.chunk_size", h.chunk_size, "≥ 0")
    _require(h.memory_budget_mb >= 0, "hessian.memory_budget_mb", h.memory_budget_mb, "≥ 0")
    _require(h.estimate_probes >= 2, "hessian.estimate_probes", h.estimate_probes, "≥ 2")
    _require(h.estimate_degree >= 0, "hessian.estimate_degree", h.estimate_degree, "≥ 0 (0 = auto)")
    _require(not (h.method == "estimate" and h.tol_mode == "gap"), "hessian.tol_mode", h.tol_mode,
             f"auto, rel or abs with hessian.method={h.method} (a gap needs a dense Hessian: eigh or inertia)")
    _require(h.batch_checkpoints >= 1, "hessian.batch_checkpoints", h.batch_checkpoints, "≥ 1")
    _require(h.data_workers >= 0, "hessian.data_workers", h.data_workers, "≥ 0 (0 = HVPs in the Hessian task)")
    _require(h.data_workers == 0 or h.method == "estimate", "hessian.data_workers", h.data_workers,
             f"0 with hessian.method={h.method} (data-parallel HVPs serve method=estimate only)")
    _require(h.num_gpus <= 1 or float(h.num_gpus).is_integer(), "hessian.num_gpus", h.num_gpus,
             "a fraction ≤ 1 or a whole number")
    seeds_of(cfg.sweep.seeds)
    _require(cfg.sweep.max_in_flight >= 0, "sweep.max_in_flight", cfg.sweep.max_in_flight, "≥ 0")
    name = str(cfg.sweep.name)
    _require(bool(name) and name not in (".", "..") and not set(name) & set("/\\"), "sweep.name", name,
             "a folder name under results_root: not empty, '.' or '..', without '/' or '\\'")
    _require(cfg.ray.train_num_cpus > 0, "ray.train_num_cpus", cfg.ray.train_num_cpus, "> 0")
    _require(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, "ray.num_cpus", cfg.ray.num_cpus,
             "≥ 1, or null (all of this machine's)")
    _require(cfg.ray.max_retries >= 0, "ray.max_retries", cfg.ray.max_retries, "≥ 0")
    _require(cfg.ray.state_every_s >= 0, "ray.state_every_s", cfg.ray.state_every_s, "≥ 0 seconds")
    for key, values in cfg.sweep.grid.items():
        _require(OmegaConf.is_list(values) and len(values) >= 1, f"sweep.grid.{key}", values,
                 "a non-empty list of values")
        _require(key.split(".")[0] in ("data", "model", "optim", "stall", "hessian"), "sweep.grid", key,
                 "keys under data., model., optim., stall. or hessian.")
        _require(OmegaConf.select(cfg, key, default=MISSING) is not MISSING or _has_key(cfg, key),
                 "sweep.grid", key, "a key that exists in the config")
        _require(not key.startswith("hessian.") or key.split(".", 1)[1] in HESSIAN_ID_KEYS, "sweep.grid", key,
                 f"hessian keys of the run id ({', '.join(HESSIAN_ID_KEYS)}); the others are settings the "
                 "whole sweep shares, which a grid point cannot change")
    # Each grid point must itself be valid, values and their combination (model=cnn with data=synthetic).
    for point in grid_points(OmegaConf.to_container(cfg.sweep.grid, resolve=True)):
        if point:
            validate_point(cfg, point)


def grid_points(grid: dict) -> list[dict]:
    """Cartesian product of ``{key: [values]}`` as a list of ``{key: value}``; ``[{}]`` for no grid."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(cfg: DictConfig, overrides: dict) -> DictConfig:
    """A resolved, plain copy of ``cfg`` with dotted-key ``overrides`` set. They are set before
    interpolations are resolved (``model.width: ${data.n_features}`` follows a grid over
    ``data.n_features``) and checked against the typed schema (``model.width=8.5`` is refused)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, True)
    for key, value in overrides.items():
        if not _has_key(out, key):
            raise ConfigError(f"sweep.grid key {key!r} does not exist in the config")
        try:
            OmegaConf.update(out, key, value, merge=False)
        except ValidationError as err:
            raise ConfigError(f"sweep.grid {key}={value!r}: {str(err).splitlines()[0]}") from None
    resolved = OmegaConf.create(OmegaConf.to_container(out, resolve=True))
    for key, value in overrides.items():
        # A whole number on a float field (0 for 0.0) keeps the grid's spelling: run ids hash the
        # config's JSON, and the runs of a sweep started before the typed check keep theirs.
        typed = OmegaConf.select(resolved, key)
        if isinstance(typed, float) and type(value) is int and typed == value:
            OmegaConf.update(resolved, key, value, merge=False)
    return resolved


def validate_point(cfg: DictConfig, overrides: dict) -> None:
    point = apply_overrides(cfg, overrides)
    point.sweep.grid = {}
    try:
        validate(point)
    except ConfigError as err:
        raise ConfigError(f"sweep.grid point {dict(overrides)}: {err}") from None

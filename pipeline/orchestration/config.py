"""Stage 1 — configuration: typed schemas, registered in Hydra's ConfigStore, and loud validation.

The dataclasses are the single source of truth for what a sweep may say. Hydra merges the YAML files
under ``conf/`` onto them, so an unknown key fails at composition time; :func:`validate` then checks
values and ranges before any run starts, and names the field and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError

from pipeline.curvature import datasets, models, problem
from pipeline.landscape import refine
from pipeline.curvature.data import DATA_NAMES
from pipeline.curvature.hessian import needs_dense
from pipeline.curvature.hessian_memory import MATRIX_FREE, METHODS as HESSIAN_METHODS
from pipeline.curvature.models import LOSSES, MODEL_NAMES
from pipeline.curvature.torch_model import BUFFER_MODES
from pipeline.curvature.spectrum import TOL_MODES
from pipeline.orchestration.train import OPTIMIZERS

ACTIVATIONS = tuple(models.ACTIVATIONS)
DTYPES = tuple(problem.DTYPES)
REFINE_METHODS = ("none", *refine.METHODS)
# Image sets and their full side (digits from scikit-learn, the others in torchvision's layout).
IMAGE_SIDES = {"digits": 8, **{name: side for name, (_, _, side) in datasets.IMAGE_SETS.items()}}
CLASSIFICATION_DATA = (*IMAGE_SIDES, "torch")  # torch: if its labels are ints
# The counting keys (HessianCounting) that enter a run's id (pipeline.orchestration.plan.run_id), so may vary over a
# sweep's grid; the estimator's settings never entered it (pinned ids: a resumed sweep keeps its runs), and
# HessianResources never change what a run computes.
HESSIAN_ID_KEYS = ("method", "dtype", "tol_mode", "rel_tol", "abs_tol", "gap_ratio", "params")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and what is allowed."""


@dataclass
class DataConfig:
    name: str = "digits"  # synthetic | digits | gaussian
    seed: Optional[int] = 0  # seed of the data set; null = each run's own seed (a new data set per run)
    n_samples: int = 256  # synthetic/gaussian: samples drawn; digits: first n (0 = all 1,797)
    n_features: int = 4  # synthetic/gaussian input dimension (digits: 64, or side² when downsampled)
    n_outputs: int = 1  # synthetic/gaussian target dimension (digits: 10 classes)
    teacher_width: int = 8  # hidden width of the random tanh teacher that labels synthetic inputs
    noise: float = 0.0  # std of Gaussian label noise added to synthetic targets
    side: int = 4  # image side after block-mean downsampling (digits 8/4/2; mnist 28, 14, 7, …; cifar10 32, 16, …)
    batch_size: int = 0  # 0 = full batch (for training, and for Hessian accumulation)
    standardize: bool = True
    # mnist | fashion_mnist | cifar10: torchvision's on-disk layout under root (pipeline.curvature.datasets)
    root: str = "data"  # folder holding MNIST/, FashionMNIST/ or cifar-10-batches-py/
    download: bool = False  # fetch a missing data set with torchvision (needs torchvision installed)
    split: str = "train"  # train | test
    # name=torch: the user's data, a callable at this import path returning (X, Y) or a torch Dataset
    _target_: Optional[str] = None
    kwargs: dict = field(default_factory=dict)  # its keyword arguments
    n_classes: int = 0  # its integer labels' classes; 0 = max label + 1


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
    # name=torch only: the user's torch.nn.Module (pipeline.curvature.torch_model)
    _target_: Optional[str] = None  # import path of its class, e.g. my_pkg.nets.SmallResNet
    kwargs: dict = field(default_factory=dict)  # constructor arguments
    buffers: str = "eval"  # eval: running statistics as built | train: batch statistics (BatchNorm)


# The model keys each model.name reads (pipeline.curvature.models.make_model). A run's other model keys hold
# defaults that describe nothing about it (an nn.Module has no model.width), so its runs row leaves them empty.
MODEL_KEYS_READ = {"mlp": ("name", "depth", "width", "activation", "bias", "loss"),
                   "cnn": ("name", "depth", "width", "activation", "bias", "loss", "conv_layers", "channels", "kernel"),
                   "torch": ("name", "loss", "_target_", "kwargs", "buffers")}


# The data keys each data.name reads (pipeline.curvature.data.make_dataset); the same holds for its runs row.
_ANY_DATA = ("name", "n_samples", "batch_size", "standardize")
_IMAGES = (*_ANY_DATA, "root", "download", "split", "side")
DATA_KEYS_READ = {"synthetic": (*_ANY_DATA, "seed", "n_features", "n_outputs", "teacher_width", "noise"),
                  "gaussian": (*_ANY_DATA, "seed", "n_features", "n_outputs"),
                  "digits": (*_ANY_DATA, "side"),
                  "mnist": _IMAGES, "fashion_mnist": _IMAGES, "cifar10": _IMAGES,
                  "torch": (*_ANY_DATA, "_target_", "kwargs", "n_classes")}
KEYS_READ = {"model": MODEL_KEYS_READ, "data": DATA_KEYS_READ}
# Where a run's data sit (the folder, whether a missing set may be fetched), not what it computes: in no run
# id and no sweep identity, so a sweep resumes on a node whose data.root differs.
NOT_IN_ID = {"data": ("root", "download")}
WHERE_KEYS = frozenset(f"{section}.{key}" for section, keys in NOT_IN_ID.items() for key in keys)


def reads(section: str, kind: str, key: str) -> bool:
    """Whether a ``section`` (model or data) of kind ``kind`` (its ``name``) reads its setting
    ``<section>.<key>`` (:data:`KEYS_READ`); every other section, and an unknown kind, reads every key."""
    read = KEYS_READ.get(section, {}).get(kind)
    return read is None or key in read


@dataclass
class OptimConfig:
    name: str = "gd"  # gd (full batch) | sgd (mini-batch, data.batch_size) | adam
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0  # L2 penalty λ/2·‖θ‖² added to the loss (and to its Hessian)
    max_steps: int = 4000
    log_every: int = 10  # record full-batch loss and gradient norm every k steps
    dtype: str = "float64"


@dataclass
class StallConfig:
    window: int = 500  # steps over which the relative improvement is measured
    threshold: float = 2e-2  # stall when (L[t-window] - L[t]) / |L[t-window]| < threshold
    max_stalls: int = 2  # stop a run after this many stalls (it also stops at optim.max_steps)
    # Stall tags (oscillating vs small_gradient) — see pipeline.landscape.stall.stall_tag:
    grad_ratio_tol: float = 1e-2  # oscillating when ‖g‖/‖g₀‖ ≥ this
    cosine_tol: float = 0.0  # … or when successive gradients have cosine < this
    sharpness_tol: float = 0.9  # λmax·lr/(2(1+momentum)) ≥ this is reported (edge of stability), never a tag
    power_iters: int = 50  # power-iteration steps for λmax (at stalls, and in curves)
    curvature_every: int = 0  # log λmax and the gradient cosine in `curves` every k steps; 0 = off


@dataclass
class HessianCounting:
    """What the Hessian task computes at a point: the method, precision, tolerance rule and estimator."""
    method: str = "auto"  # auto | eigh | inertia | estimate
    dtype: str = "float64"
    tol_mode: str = "auto"  # auto (eigh: gap, else rel; inertia: rel) | gap (eigh and inertia alike) | rel | abs
    rel_tol: float = 1e-6  # tol = rel_tol · max|λ| when no clear gap
    abs_tol: float = 0.0  # used when tol_mode = abs
    gap_ratio: float = 1e4  # a "clear gap": consecutive |λ| differ by at least this factor
    estimate_probes: int = 30  # method=estimate: Rademacher probes of the stochastic trace
    estimate_degree: int = 0  # method=estimate: Chebyshev degree; 0 = the least that resolves tol
    naive_count: bool = True  # inertia: a third LDLᵀ (of H itself) for the naive #{λ > 0}; false skips it
    params: Any = None  # null/all = every trainable parameter; a regex searched in names, or a list of names


@dataclass
class HessianResources:
    """Where and how fast a Hessian task runs, never what it computes: its Ray resources, how many
    checkpoints it takes, its workspace, and the actors that split the data for its HVPs. A sweep may
    resume with other values (pipeline.orchestration.identity), and they never enter a run's id."""
    num_gpus: float = 0.0  # GPUs per Hessian task (fractional allowed); 0 = CPU
    num_cpus: float = 1.0
    chunk_size: int = 0  # Hessian columns built per vmap call; 0 = derived from memory_budget_mb
    memory_budget_mb: float = 0.0  # 0 = a share of free device memory
    batch_checkpoints: int = 8  # checkpoints of one architecture analysed per task
    data_workers: int = 0  # method=estimate: Ray actors that split the data for HVPs (0 = in the task)


@dataclass
class HessianConfig(HessianResources, HessianCounting):
    """The ``hessian:`` section a user writes: one flat namespace (``hessian.num_gpus=0.25``,
    ``hessian.rel_tol=1e-8``) holding the keys of both records. A run's typed config keeps them apart
    (:class:`RunConfig` ``.hessian`` and ``.hessian_task``)."""


@dataclass
class RefineConfig:
    method: str = "none"  # none | newton_mr | gnm | newton_eig: move each stalled point to a nearby critical point
    gtol2: float = 1e-10  # converged when ‖g‖² < gtol2; also the "critical" threshold of every label
    max_iters: int = 100  # Newton steps (gnm: descent steps)
    inner_max_iters: int = 500  # MINRES iterations per Newton step
    inner_rtol: float = 1e-10
    forcing: float = 0.1  # inexact Newton: MINRES tolerance min(forcing, max(inner_rtol, ‖g‖^½))
    rcond: float = 1e-10
    operator: str = "auto"  # auto | hvp | dense (pipeline.landscape.refine.resolve_operator)
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
    seeds: Any = 24  # a count (seeds 0..n-1) or an explicit list of ints
    grid: dict = field(default_factory=dict)  # dotted key -> list of values, crossed with seeds
    max_in_flight: int = 0  # tasks in flight at once; 0 = 2 × cluster CPUs
    progress: str = "auto"  # auto | live | plain | none
    extend: bool = False  # add runs of another config to an existing sweep (pipeline.orchestration.identity)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start a local Ray; "auto", "host:port" or "ray://…"
    num_cpus: Optional[int] = None  # local Ray only: CPUs to offer (None = all)
    train_num_cpus: float = 1.0  # CPUs per training task
    train_num_gpus: float = 0.0  # GPUs per training task (fractional allowed); 0 = train on the CPU
    max_retries: int = 3  # Ray retries of a task whose worker died
    state_every_s: float = 60.0  # seconds between saves of a training task's state; a retry resumes there
    runtime_env: dict = field(default_factory=dict)
    # The cluster adds nodes on demand (Ray autoscaler, KubeRay): a request no live node meets yet (e.g. GPUs on
    # a cluster whose GPU nodes scale from zero) waits for such a node instead of being refused before any work.
    autoscaler: bool = False


@dataclass
class PlotConfig:
    hue: str = ""  # a config key (e.g. model.width) whose value colours the minimum-ratio figure; "" = label
    full_range: bool = False  # minimum-ratio axes from 0 to 1 instead of the data's range


@dataclass
class Config:
    """The whole config. Its defaults are those of the options ``conf/config.yaml`` picks (a test holds
    them equal), so a value has one default wherever it is read."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stall: StallConfig = field(default_factory=StallConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    results_root: str = "results"
    figures: bool = True
    plot: PlotConfig = field(default_factory=PlotConfig)  # how minratio-sweep draws its figures


@dataclass(frozen=True)
class RunConfig:
    """One run's resolved config, typed: built once per run by :func:`pipeline.orchestration.plan.expand`
    and carried as is (pickled, a few kB) to its training, Hessian and refinement tasks, which read
    ``config.hessian.rel_tol``. The user's flat ``hessian:`` section is split into what a task computes
    (``hessian``) and where and how fast it runs (``hessian_task``)."""
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    stall: StallConfig
    hessian: HessianCounting
    hessian_task: HessianResources
    refine: RefineConfig

    @classmethod
    def from_sections(cls, sections: dict) -> "RunConfig":
        """The typed config of resolved sections ``{"data": {...}, ..., "refine": {...}}``, checked against
        the schema (``1`` on a float field becomes ``1.0``); a key a section lacks takes its default."""
        typed = {name: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), sections.get(name, {})))
                 for name, schema in _SECTIONS.items() if name in RUN_SECTIONS}
        h = typed.pop("hessian")
        return cls(**typed, hessian=_part(HessianCounting, h), hessian_task=_part(HessianResources, h))

    def sections(self) -> dict:
        """The run's config as the user wrote it, plain containers by section (``hessian`` flat again): what
        the ``runs`` table records (``config_json`` and one column per key)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in RUN_SECTIONS if name != "hessian"}
        return {**out, "hessian": {**dataclasses.asdict(self.hessian), **dataclasses.asdict(self.hessian_task)}}


def _part(record: type, whole: Any) -> Any:
    """The fields of dataclass ``record`` taken from ``whole`` (a dataclass holding at least them)."""
    return record(**{f.name: getattr(whole, f.name) for f in dataclasses.fields(record)})


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "stall": StallConfig,
             "hessian": HessianConfig, "refine": RefineConfig, "sweep": SweepConfig, "ray": RayConfig}


def register_configs() -> None:
    """Register the schema of the primary config, onto which ``conf/config.yaml`` and each group's option
    are merged: an unknown key or a wrong type fails at composition. Only the whole config is stored,
    so ``--help`` lists the YAML options alone."""
    ConfigStore.instance().store(name="base_config", node=Config)


def _require(cond: bool, field_name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is not allowed: expected {allowed}")


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


# A rule: the key its message names, a test of the whole config, and what is allowed (text, or a function
# of the config for text that quotes another setting). validate() applies them in order.
Rule = tuple[str, Callable[[DictConfig], bool], Union[str, Callable[[DictConfig], str]]]

VOCABULARIES = {"data.name": DATA_NAMES, "model.name": MODEL_NAMES, "model.activation": ACTIVATIONS,
                "model.loss": LOSSES, "optim.name": OPTIMIZERS, "optim.dtype": DTYPES,
                "hessian.method": HESSIAN_METHODS, "hessian.dtype": DTYPES, "hessian.tol_mode": TOL_MODES,
                "sweep.progress": ("auto", "live", "plain", "none"), "refine.method": REFINE_METHODS,
                "refine.operator": refine.OPERATORS, "model.buffers": BUFFER_MODES,
                "data.split": ("train", "test")}


def _schema_floats(schema: Optional[type] = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of every float field of the schema (``optim.lr``, …), found from the dataclasses' types."""
    schema = schema or Config
    out: list[str] = []
    for name, kind in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):
            out.extend(_schema_floats(kind, f"{prefix}{name}."))
        elif kind in (float, Optional[float]):
            out.append(prefix + name)
    return tuple(out)


FLOAT_KEYS = _schema_floats()


def _finite(key: str) -> Rule:
    """Every float setting is a finite number (or null where the schema allows it): ±inf and NaN would
    pass most range checks or silently switch them off."""
    return (key, lambda c: OmegaConf.select(c, key) is None or math.isfinite(OmegaConf.select(c, key)),
            "a finite number")


def _one_of(key: str, allowed: tuple) -> Rule:
    return (key, lambda c: OmegaConf.select(c, key) in allowed, "one of " + ", ".join(allowed))


def _whole_or_fraction(key: str) -> Rule:
    return (key, lambda c: OmegaConf.select(c, key) <= 1 or float(OmegaConf.select(c, key)).is_integer(),
            "a fraction ≤ 1 or a whole number")


# Ray keeps resource quantities to 4 decimal places and refuses a request with more ("0.33333"), when the
# task is submitted, mid-sweep; the shares a task asks for are checked here instead.
RAY_DECIMALS = 4
RAY_SHARE_KEYS = ("hessian.num_gpus", "hessian.num_cpus", "refine.num_gpus", "refine.num_cpus",
                 "ray.train_num_gpus", "ray.train_num_cpus")


def _ray_quantity(key: str) -> Rule:
    def ok(c: DictConfig) -> bool:
        value = float(OmegaConf.select(c, key))
        return abs(round(value, RAY_DECIMALS) - value) <= 1e-12 * max(1.0, abs(value))
    return (key, ok, f"at most {RAY_DECIMALS} decimal places (Ray's resource precision), e.g. 0.3333 or 0.25")


def _folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not set(name) & set("/\\")


RUN_SECTIONS = ("data", "model", "optim", "stall", "hessian", "refine")  # what a run records of its config
SCALARS = (int, float, str, bool)


# {"model.kwargs", "data.kwargs"}: the run sections' dict settings, whose keys are the user's (a constructor's
# arguments), not the schema's.
FREE_FORM_KEYS = frozenset(f"{section}.{name}" for section in RUN_SECTIONS
                           for name, hint in typing.get_type_hints(_SECTIONS[section]).items() if hint is dict)


def recorded_keys() -> dict[str, type]:
    """``{"model.width": int, …}``: every setting of a run's sections whose type is a plain int, float, str or
    bool (null allowed), in the schema's order. The ``runs`` table holds one column for each
    (:mod:`pipeline.orchestration.tables`), so a figure can be coloured by it (``plot.hue``); a dict
    (``model.kwargs``) or a free-form value (``hessian.params``) lives in ``config_json`` alone."""
    out = {}
    for section in RUN_SECTIONS:
        hints = typing.get_type_hints(_SECTIONS[section])
        for f in dataclasses.fields(_SECTIONS[section]):
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            base = args[0] if typing.get_origin(hints[f.name]) is Union and len(args) == 1 else hints[f.name]
            if base in SCALARS:
                out[f"{section}.{f.name}"] = base
    return out

RULES: tuple[Rule, ...] = (
    *(_finite(key) for key in FLOAT_KEYS),
    *(_one_of(key, allowed) for key, allowed in VOCABULARIES.items()),
    ("data.n_samples", lambda c: c.data.n_samples >= (0 if c.data.name in (*IMAGE_SIDES, "torch") else 1),
     "≥ 1 (digits, mnist, fashion_mnist, cifar10, torch: 0 = all)"),
    ("data.seed", lambda c: c.data.seed is None or c.data.seed >= 0, "null or an int ≥ 0"),
    ("data.n_samples", lambda c: c.data.name != "digits" or c.data.n_samples <= 1797,
     "≤ 1797 for data.name=digits (0 = all 1,797)"),
    ("data.n_features", lambda c: c.data.n_features >= 1, "≥ 1"),
    ("data.n_outputs", lambda c: c.data.n_outputs >= 1, "≥ 1"),
    ("data.n_classes", lambda c: c.data.n_classes >= 0, "≥ 0 (0 = from the data)"),
    ("data.teacher_width", lambda c: c.data.teacher_width >= 1, "≥ 1"),
    ("data.noise", lambda c: c.data.noise >= 0, "≥ 0"),
    ("data.side", lambda c: c.data.name != "digits" or c.data.side in (2, 4, 8), "2, 4 or 8 for data.name=digits"),
    ("data.batch_size", lambda c: c.data.batch_size >= 0, "≥ 0 (0 = full batch)"),
    ("model.depth", lambda c: c.model.depth >= 0, "≥ 0 hidden layers"),
    ("model.width", lambda c: c.model.width >= 1, "≥ 1"),
    ("data.name", lambda c: c.model.name != "cnn" or c.data.name in ("digits", "mnist", "fashion_mnist"),
     "digits, mnist or fashion_mnist with model.name=cnn (one-channel images; others: model=torch)"),
    ("model.conv_layers", lambda c: c.model.name != "cnn" or c.model.conv_layers >= 1, "≥ 1"),
    ("model.channels", lambda c: c.model.name != "cnn" or c.model.channels >= 1, "≥ 1"),
    ("model.kernel", lambda c: c.model.name != "cnn" or (c.model.kernel >= 1 and c.model.kernel % 2 == 1),
     "an odd size ≥ 1 (same padding needs a centre)"),
    # A wider kernel has weights that never meet a pixel: exact zero rows of the Hessian.
    ("model.kernel", lambda c: c.model.name != "cnn" or c.model.kernel <= 2 * c.data.side - 1,
     lambda c: f"≤ {2 * c.data.side - 1} = 2·data.side − 1 (data.side={c.data.side})"),
    ("model.loss", lambda c: not (c.model.loss == "cross_entropy" and c.data.name not in CLASSIFICATION_DATA),
     f"mse for regression data (cross_entropy needs data.name in {', '.join(CLASSIFICATION_DATA)})"),
    ("optim.lr", lambda c: c.optim.lr > 0, "> 0"),
    ("optim.momentum", lambda c: 0 <= c.optim.momentum < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda c: c.optim.weight_decay >= 0, "≥ 0"),
    ("optim.max_steps", lambda c: c.optim.max_steps >= 1, "≥ 1"),
    ("optim.log_every", lambda c: c.optim.log_every >= 1, "≥ 1"),
    ("data.batch_size", lambda c: not (c.optim.name == "sgd" and c.data.batch_size == 0),
     "≥ 1 with optim.name=sgd (mini-batch)"),
    ("stall.window", lambda c: c.stall.window >= c.optim.log_every,
     lambda c: f"≥ optim.log_every ({c.optim.log_every})"),
    ("stall.threshold", lambda c: c.stall.threshold > 0, "> 0"),
    ("stall.max_stalls", lambda c: c.stall.max_stalls >= 1, "≥ 1"),
    ("stall.grad_ratio_tol", lambda c: c.stall.grad_ratio_tol > 0, "> 0"),
    ("stall.power_iters", lambda c: c.stall.power_iters >= 1, "≥ 1"),
    ("stall.curvature_every", lambda c: c.stall.curvature_every >= 0, "≥ 0 (0 = off)"),
    ("refine.gtol2", lambda c: c.refine.gtol2 > 0, "> 0"),
    ("refine.max_iters", lambda c: c.refine.max_iters >= 1, "≥ 1"),
    ("refine.inner_max_iters", lambda c: c.refine.inner_max_iters >= 1, "≥ 1"),
    ("refine.damping", lambda c: c.refine.damping > 0, "> 0"),
    ("refine.min_damping", lambda c: c.refine.min_damping > 0, "> 0"),
    ("refine.max_tries", lambda c: c.refine.max_tries >= 1, "≥ 1"),
    ("refine.patience", lambda c: c.refine.patience >= 1, "≥ 1"),
    ("refine.progress", lambda c: c.refine.progress > 1, "> 1"),
    ("refine.forcing", lambda c: 0 < c.refine.forcing < 1, "in (0, 1)"),
    ("refine.num_cpus", lambda c: c.refine.num_cpus > 0, "> 0"),
    ("refine.num_gpus", lambda c: c.refine.num_gpus >= 0, "≥ 0"),
    _whole_or_fraction("refine.num_gpus"),
    *(_ray_quantity(key) for key in RAY_SHARE_KEYS),
    ("hessian.rel_tol", lambda c: 0 <= c.hessian.rel_tol < 1, "in [0, 1)"),
    ("hessian.abs_tol", lambda c: c.hessian.abs_tol >= 0, "≥ 0"),
    ("hessian.gap_ratio", lambda c: c.hessian.gap_ratio > 1, "> 1"),
    ("hessian.num_gpus", lambda c: c.hessian.num_gpus >= 0, "≥ 0"),
    ("hessian.num_cpus", lambda c: c.hessian.num_cpus > 0, "> 0"),
    ("hessian.chunk_size", lambda c: c.hessian.chunk_size >= 0, "≥ 0"),
    ("hessian.memory_budget_mb", lambda c: c.hessian.memory_budget_mb >= 0, "≥ 0"),
    ("hessian.estimate_probes", lambda c: c.hessian.estimate_probes >= 2, "≥ 2"),
    ("hessian.estimate_degree", lambda c: c.hessian.estimate_degree >= 0, "≥ 0 (0 = auto)"),
    ("hessian.tol_mode", lambda c: not (c.hessian.method in MATRIX_FREE and needs_dense(None, c.hessian.tol_mode)),
     lambda c: f"auto, rel or abs with hessian.method={c.hessian.method} (a gap needs a dense Hessian: eigh or inertia)"),
    ("hessian.batch_checkpoints", lambda c: c.hessian.batch_checkpoints >= 1, "≥ 1"),
    ("hessian.data_workers", lambda c: c.hessian.data_workers >= 0, "≥ 0 (0 = HVPs in the Hessian task)"),
    ("hessian.data_workers", lambda c: c.hessian.data_workers == 0 or c.hessian.method == "estimate",
     lambda c: f"0 with hessian.method={c.hessian.method} (data-parallel HVPs serve method=estimate only)"),
    _whole_or_fraction("hessian.num_gpus"),
    ("sweep.seeds", lambda c: bool(seeds_of(c.sweep.seeds)), "a count ≥ 1 or a list of ints"),
    ("sweep.max_in_flight", lambda c: c.sweep.max_in_flight >= 0, "≥ 0"),
    ("sweep.name", lambda c: _folder_name(str(c.sweep.name)),
     "a folder name under results_root: not empty, '.' or '..', without '/' or '\\'"),
    ("ray.train_num_cpus", lambda c: c.ray.train_num_cpus > 0, "> 0"),
    ("ray.train_num_gpus", lambda c: c.ray.train_num_gpus >= 0, "≥ 0 (0 = train on the CPU)"),
    _whole_or_fraction("ray.train_num_gpus"),
    ("ray.num_cpus", lambda c: c.ray.num_cpus is None or c.ray.num_cpus >= 1, "≥ 1, or null (all of this machine's)"),
    ("ray.max_retries", lambda c: c.ray.max_retries >= 0, "≥ 0"),
    ("ray.state_every_s", lambda c: c.ray.state_every_s >= 0, "≥ 0 seconds"),
    # the runs table holds one column per recorded setting, which the figure reads after the sweep
    ("plot.hue", lambda c: not c.plot.hue or c.plot.hue in recorded_keys(),
     f"'' (colour by label) or a setting under {', '.join(s + '.' for s in RUN_SECTIONS)} that the runs table "
     "holds as a column, e.g. model.width (not a dict such as model.kwargs, nor hessian.params)"),
)


def validate(cfg: DictConfig) -> None:
    """Check every value of a composed config against :data:`RULES`, then the grid and each of its points;
    raise :class:`ConfigError` naming the first bad field."""
    check_deleted_keys(cfg)
    for key, ok, allowed in RULES:
        _require(ok(cfg), key, OmegaConf.select(cfg, key), allowed if isinstance(allowed, str) else allowed(cfg))
    validate_user_parts(cfg)
    check_unread_keys(cfg)
    _validate_grid(cfg)


def _validate_grid(cfg: DictConfig) -> None:
    """Each ``sweep.grid`` key names a setting a grid point may change, and each point is itself valid,
    values and their combination (model=cnn with data=synthetic)."""
    for key, values in cfg.sweep.grid.items():
        _require(OmegaConf.is_list(values) and len(values) >= 1, f"sweep.grid.{key}", values,
                 "a non-empty list of values")
        _require(key.split(".")[0] in ("data", "model", "optim", "stall", "hessian"), "sweep.grid", key,
                 "keys under data., model., optim., stall. or hessian.")
        _require(OmegaConf.select(cfg, key, default=MISSING) is not MISSING or _has_key(cfg, key)
                 or _in_free_form(key), "sweep.grid", key,
                 "a key that exists in the config (or an argument under model.kwargs or data.kwargs)")
        _require(not key.startswith("hessian.") or key.split(".", 1)[1] in HESSIAN_ID_KEYS, "sweep.grid", key,
                 f"hessian keys of the run id ({', '.join(HESSIAN_ID_KEYS)}); the others are settings the "
                 "whole sweep shares, which a grid point cannot change")
    for point in grid_points(OmegaConf.to_container(cfg.sweep.grid, resolve=True)):
        if point:
            validate_point(cfg, point)


def validate_user_parts(cfg: DictConfig) -> None:
    """The keys of a user's model and data (``model=torch``, ``data=torch``), real image sets and
    ``hessian.params``: each ``_target_`` set exactly where its ``name`` reads it, ``kwargs`` empty where
    nothing reads them, sides that divide the
    image, a known split and buffers mode. Whether the import paths resolve is checked where the model is
    built, before any run (:func:`pipeline.orchestration.sweep.check_problems`)."""
    d, m = cfg.data, cfg.model
    for sec, node in (("model", m), ("data", d)):
        target = node.get("_target_")
        if node.name == "torch":
            what = "a torch.nn.Module class" if sec == "model" else "a callable returning (X, Y) or a Dataset"
            _require(isinstance(target, str) and bool(target.strip()), f"{sec}._target_", target,
                     f"the import path of {what} with {sec}.name=torch")
        else:
            _require(target is None, f"{sec}._target_", target,
                     f"null with {sec}.name={node.name} (a user's {sec} needs {sec}=torch)")
            kwargs = node.get("kwargs")
            _require(not kwargs, f"{sec}.kwargs", OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs)
                     else kwargs, f"{{}} with {sec}.name={node.name}, which reads no kwargs (they are a user's "
                     f"{sec}'s arguments, {sec}=torch)")
    if d.name in IMAGE_SIDES and d.name != "digits":
        full = IMAGE_SIDES[d.name]
        _require(1 <= d.side <= full and full % d.side == 0, "data.side", d.side,
                 f"a divisor of {full} for data.name={d.name} (block-mean downsampling)")
    p = cfg.hessian.get("params")
    ok = p is None or (isinstance(p, str) and bool(p)) or (
        OmegaConf.is_list(p) and len(p) >= 1 and all(isinstance(x, str) and x for x in p))
    _require(ok, "hessian.params", p, "null or all (every parameter), a regex, or a non-empty list of names")
    _require(p is None or p == "all" or cfg.hessian.data_workers == 0, "hessian.params", p,
             "null with hessian.data_workers > 0 (data-parallel HVPs take every parameter)")
    _require(not (m.buffers == "train" and m.name == "torch" and d.batch_size > 0), "model.buffers", m.buffers,
             "eval with data.batch_size > 0: batch statistics would make the Hessian's loss depend on how the "
             "data are split (use data.batch_size=0 for model.buffers=train)")
    _require(not (m.buffers == "train" and m.name == "torch" and cfg.hessian.data_workers > 0), "model.buffers",
             m.buffers, "eval with hessian.data_workers > 0: each data shard's batch statistics would make the "
             "HVPs those of another loss than the full-batch one (use hessian.data_workers=0 for model.buffers=train)")


def _deleted(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of ``schema``'s fields absent from ``node``, each named at its highest missing level."""
    out = []
    for name, kind in typing.get_type_hints(schema).items():
        if name not in node:
            out.append(prefix + name)
        elif dataclasses.is_dataclass(kind) and isinstance(node[name], DictConfig):
            out += _deleted(node[name], kind, f"{prefix}{name}.")
    return out


def check_deleted_keys(cfg: DictConfig) -> None:
    """Refuse a config that lacks a key of the schema: one deleted with Hydra's ``~`` (``~figures``; Hydra
    lets ``~`` remove a top-level field of the typed config), or a user's own primary config
    (``--config-name``) not built on the schema. Every field is read, so the sweep would fail on the first
    read of it (an attribute error; for ``figures``, after the whole sweep)."""
    gone = _deleted(cfg, Config)
    if not gone:
        return
    if OmegaConf.get_type(cfg) is not Config:
        shown = ", ".join(gone[:8]) + (f" and {len(gone) - 8} more" if len(gone) > 8 else "")
        raise ConfigError(f"the primary config lacks keys of minratio's schema ({shown}): put base_config first "
                          "in its defaults list, as conf/config.yaml does, so that every key has its default")
    raise ConfigError(f"{', '.join(gone)}: deleted with '~', but minratio reads every key of its config; set "
                      "a value instead (`minratio-sweep --cfg job` shows each key and its default)")


def check_unread_keys(cfg: DictConfig) -> None:
    """Refuse keys that no schema declares — a ``+model._target_=…`` on a model that reads no such key, or a
    typo added with ``+`` — naming each: Hydra's ``+`` adds keys to the typed config without complaint,
    and nothing would read them."""
    unread = []
    for name, schema in _SECTIONS.items():
        node = cfg.get(name)
        if isinstance(node, DictConfig):
            known = {f.name for f in dataclasses.fields(schema)}
            unread += [f"{name}.{k}" for k in node.keys() if k not in known]
    top = {f.name for f in dataclasses.fields(Config)}
    unread += [str(k) for k in cfg.keys() if k not in top and k != "hydra"]
    if unread:
        raise ConfigError(f"{', '.join(sorted(unread))}: no such key, so nothing would read it (a key added "
                          "with '+' must be one minratio knows; see `minratio-sweep --cfg job` for the keys; "
                          "a user's model takes its arguments under model.kwargs)")


def _interpolated(cfg: DictConfig) -> set[str]:
    """The dotted keys that interpolations anywhere in ``cfg`` read (``${data.side}`` under ``model.kwargs``)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            # ${data.side}; not ${now:…} nor another resolver's call
            found.update(ref.strip() for ref in re.findall(r"\$\{([^}:]+)\}", node))

    walk(OmegaConf.to_container(cfg, resolve=False))
    return found


def new_sweep_refusals(cfg: DictConfig, set_keys: Iterable[str] = ()) -> list[str]:
    """What this version refuses in a command that the versions before it ran: settings the command sets
    (``set_keys``, dotted keys of its overrides, and its grid's keys) that its kind of model or data does not
    read (``model.width=16`` with ``model=torch``: the runs compute what they compute without it, under run ids
    of their own), and ``data.batch_size > 0`` with ``optim=gd`` (mini-batches under a full-batch name).
    The caller refuses them for a new sweep and lets a sweep of an earlier version resume with them (its run
    ids hold them). Where the data sit, keys an interpolation reads and keys of a kind the grid varies count
    as read."""
    grid = set(cfg.sweep.grid or {})
    skip = WHERE_KEYS | _interpolated(cfg)
    by_section: dict[str, list[str]] = {}
    for key in dict.fromkeys([*set_keys, *grid]):
        section, _, name = key.partition(".")
        if section not in KEYS_READ or f"{section}.name" in grid or key in skip:
            continue
        if not reads(section, cfg[section].name, name.split(".")[0]):
            by_section.setdefault(section, []).append(key)
    out = []
    for section, keys in by_section.items():
        kind = cfg[section].name
        hint = {"model": "; a user's module takes its arguments under model.kwargs",
                "data": "; a user's data callable takes its arguments under data.kwargs"}[section]
        out.append(f"{', '.join(keys)}: {section}.name={kind} does not read {'it' if len(keys) == 1 else 'them'} (it "
                   f"reads {section}.{{{', '.join(KEYS_READ[section][kind])}}}){hint if kind == 'torch' else ''}")
    if cfg.optim.name == "gd" and cfg.data.batch_size > 0:
        out.append(f"data.batch_size={cfg.data.batch_size} with optim.name=gd: gd is full-batch gradient descent; "
                   "mini-batches are optim=sgd")
    return out


def grid_points(grid: dict) -> list[dict]:
    """Cartesian product of ``{key: [values]}`` as a list of ``{key: value}``; ``[{}]`` for no grid."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]


def _in_free_form(dotted: str) -> bool:
    """Whether ``dotted`` names an entry inside a free-form dict (``model.kwargs.width``): a grid may add it."""
    return any(dotted.startswith(f"{key}.") for key in FREE_FORM_KEYS)


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
        added = _in_free_form(key)  # a constructor's argument the base config does not give
        if not (added or _has_key(out, key)):
            raise ConfigError(f"sweep.grid key {key!r} does not exist in the config")
        try:
            OmegaConf.update(out, key, value, merge=False, force_add=added)
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

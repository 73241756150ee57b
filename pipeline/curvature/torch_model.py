"""A user's ``torch.nn.Module`` as a function of one flat parameter vector, through ``torch.func.functional_call``.

minratio's Hessian is taken with respect to a flat ``theta`` ``[N]``; a :class:`TorchModel` lays the
module's trainable parameters end to end in ``module.named_parameters()`` order and evaluates the module
with views of ``theta`` in their place — the user's code is called as it is, never copied or rewritten.

Buffers (BatchNorm running statistics and the like) are constants of the loss, never updated: minratio
trains θ only. Which statistics a normalisation layer uses is the ``buffers`` mode:

- ``eval`` (default): the module in eval mode, its buffers as the constructor left them (a fresh
  BatchNorm: running mean 0, variance 1, so it is a fixed affine map of its input).
- ``train``: the module in train mode with running-statistics tracking switched off, so every
  normalisation layer uses the statistics of the batch the loss is evaluated on (the full data set for
  the full-batch loss whose Hessian is taken).

The loss must be a deterministic function of θ: :func:`check_model` refuses active dropout, random
numbers drawn inside ``forward``, buffers that ``forward`` changes, and modules that ``torch.func.vmap``
cannot run, each with a message naming the module and the reason; every call refuses outputs in a
narrower dtype than θ's (a float64 Hessian through float32 or integer outputs would not be float64-accurate). No Ray or Hydra here: the target is an
import path string, resolved with :mod:`importlib`.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

BUFFER_MODES = ("eval", "train")


class ModelError(ValueError):
    """A user's module cannot be used: the message names the module (or import path) and the reason."""


def import_object(path: str) -> Any:
    """The object that a dotted import path names (``pkg.module.Name`` or ``pkg.module.Outer.Inner``).

    Tries the longest importable module prefix, then attribute lookups; raises :class:`ModelError`
    naming the path and what failed (no such module, or no such attribute in it)."""
    if not isinstance(path, str) or not path or "." not in path.strip("."):
        raise ModelError(f"import path {path!r} must be dotted, like my_pkg.nets.SmallResNet")
    parts = path.split(".")
    module, err = None, None
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError as e:
            # A module that exists but fails inside (imports something missing) is the user's real error.
            missing = e.name or ""
            if not ".".join(parts[:cut]).startswith(missing):
                raise ModelError(f"importing {'.'.join(parts[:cut])!r} (for {path!r}) failed: {e}") from e
            err = e
    if module is None:
        raise ModelError(f"cannot import {path!r}: no module {parts[0]!r} on the Python path ({err}); put its "
                         "package on PYTHONPATH or pip-install it (Ray workers need it too)") from None
    obj = module
    for name in parts[cut:]:
        if not hasattr(obj, name):
            raise ModelError(f"cannot import {path!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} "
                             f"has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def plain(x: Any) -> Any:
    """``x`` with mappings as dicts and sequences as lists, recursively (a config node's kwargs become the
    plain Python values a user's constructor expects)."""
    if hasattr(x, "items"):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or (hasattr(x, "__iter__") and hasattr(x, "__len__") and not isinstance(
            x, (str, bytes, torch.Tensor))):
        return [plain(v) for v in x]
    return x


def build_module(target: str, kwargs: Optional[dict] = None, seed: int = 0) -> nn.Module:
    """``target(**kwargs)`` built with the global RNG seeded by ``seed`` (its initial weights are the
    seed's), the caller's RNG state untouched. Raises :class:`ModelError` unless it is an ``nn.Module``."""
    cls = import_object(target)
    if not callable(cls):
        raise ModelError(f"model._target_={target!r} is {type(cls).__name__}, not a class or function")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            module = cls(**plain(kwargs or {}))
        except TypeError as err:
            raise ModelError(f"model._target_={target!r} with model.kwargs={dict(kwargs or {})}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model._target_={target!r} built a {type(module).__name__}, not a torch.nn.Module")
    return module


def _prepare(module: nn.Module, buffers: str) -> nn.Module:
    """``module`` set to the ``buffers`` mode (see the module docstring); returns it."""
    if buffers not in BUFFER_MODES:
        raise ModelError(f"model.buffers={buffers!r} is not allowed: expected one of {', '.join(BUFFER_MODES)}")
    if buffers == "eval":
        return module.eval()
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            # batch statistics, and no in-place update of running ones (the loss stays a function of θ)
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return module


def trainable(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters that make up θ: ``(name, tensor)`` with ``requires_grad``, in named_parameters order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def flatten(module: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """θ ``[N]``: the module's trainable parameters laid end to end (CPU, ``dtype``)."""
    return torch.cat([p.detach().reshape(-1).to("cpu", dtype) for _, p in trainable(module)])


def unflatten(module: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: view of theta}`` in the shapes of the module's trainable parameters (``theta`` ``[N]``)."""
    out, i = {}, 0
    for name, p in trainable(module):
        out[name] = theta[i:i + p.numel()].view(p.shape)
        i += p.numel()
    if i != theta.shape[-1]:
        raise ValueError(f"theta has {theta.shape[-1]} entries but the module has {i} trainable parameters")
    return out


def restore(module: nn.Module, theta: torch.Tensor) -> nn.Module:
    """Copy ``theta`` ``[N]`` (e.g. a checkpoint's) into ``module``'s trainable parameters, in place, and
    return the module — how a user gets their network back at a stalled or refined point."""
    with torch.no_grad():
        for name, view in unflatten(module, theta.detach()).items():
            module.get_parameter(name).copy_(view)
    return module


@dataclass(frozen=True, eq=False)
class TorchModel:
    """A user's module as minratio's model interface: ``n_params``, ``init(seed)``, ``forward(theta, X)``
    and ``segments()``. ``X`` arrives as flat rows ``[n, d]`` and is reshaped to ``[n, *sample_shape]``
    before the module sees it; the module returns ``[n, out_dim]``. The module is built with ``seed``
    (the run's), so buffers drawn at random by its constructor are the run's too."""

    target: str  # import path of an nn.Module class (or a function returning one)
    kwargs: dict = field(default_factory=dict)
    sample_shape: tuple = ()  # shape of one input sample; () = the flat row
    buffers: str = "eval"  # eval | train (see the module docstring)
    seed: int = 0

    @functools.cached_property
    def module(self) -> nn.Module:
        """The module built with ``seed`` and set to the ``buffers`` mode; its parameters are replaced by
        views of θ at each call, so they are only the template of shapes and initial values."""
        return _prepare(build_module(self.target, self.kwargs, self.seed), self.buffers)

    @functools.cached_property
    def n_params(self) -> int:
        return sum(p.numel() for _, p in trainable(self.module))

    def segments(self) -> list[tuple[str, int, int]]:
        """``(name, start, size)`` of each trainable parameter in θ, in order."""
        out, i = [], 0
        for name, p in trainable(self.module):
            out.append((name, i, p.numel()))
            i += p.numel()
        return out

    def init(self, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """θ ``[N]`` of the module built with ``seed`` (its own initialisation), CPU, ``dtype``."""
        module = self.module if int(seed) == self.seed else build_module(self.target, self.kwargs, seed)
        return flatten(module, dtype)

    def _constants(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Buffers and frozen parameters on ``device``, floating ones in ``dtype`` (cached per pair)."""
        cache = self.__dict__.setdefault("_constants_cache", {})
        key = (str(device), dtype)
        if key not in cache:
            fixed = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
            cache[key] = {n: (t.detach().to(device, dtype) if t.is_floating_point() else t.detach().to(device))
                          for n, t in [*fixed, *self.module.named_buffers()]}
        return cache[key]

    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs ``[n, out_dim]`` for rows ``X`` ``[n, d]`` and parameters ``theta`` ``[N]``."""
        return self._call(unflatten(self.module, theta), X)

    def forward_parts(self, parts, X: torch.Tensor) -> torch.Tensor:
        """Outputs ``[n, out_dim]`` for rows ``X`` ``[n, d]`` and θ given as one flat part per trainable
        parameter (``parts[i]`` ``[size_i]``, in :meth:`segments` order): each part is its own tensor, so a
        derivative w.r.t. some parts never touches the others."""
        shapes = [(n, p.shape) for n, p in trainable(self.module)]
        if len(parts) != len(shapes):
            raise ValueError(f"{self.target} has {len(shapes)} trainable parameters, got {len(parts)} parts")
        return self._call({n: part.view(shape) for (n, shape), part in zip(shapes, parts)}, X)

    def _call(self, params: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        """The module on rows ``X`` ``[n, d]`` (reshaped to samples) with ``params`` in place of its own."""
        x = X.reshape(X.shape[0], *self.sample_shape) if self.sample_shape else X
        state = {**self._constants(X.device, X.dtype), **params}
        out = functional_call(self.module, state, (x,), strict=False)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{self.target} returned {type(out).__name__}, not a tensor of outputs [n, out_dim]")
        if not out.dtype.is_floating_point or torch.finfo(out.dtype).bits < torch.finfo(X.dtype).bits:
            # A float64 Hessian taken through float32 (or integer) outputs has float32 (or zero) derivatives
            # under a float64 label and tolerance: refuse it rather than count rounding noise. Outputs in a
            # wider float than θ's (float64 from float32) lose nothing.
            raise ModelError(f"{self.target} returned {str(out.dtype).replace('torch.', '')} outputs for "
                             f"{str(X.dtype).replace('torch.', '')} inputs and parameters: the module must compute "
                             "in at least the precision it is given (no .float(), .half(), .long() or tensors of "
                             "a fixed dtype made inside forward), or the Hessian's precision is not its dtype's")
        return out


def check_model(model: TorchModel, loss_fn, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                out_dim: int) -> None:
    """Refuse a module whose loss is not a deterministic, vmappable function of θ, before any run.

    ``loss_fn(theta)``: the loss on a few rows ``X``, ``Y``; ``theta`` ``[N]``: a point; ``out_dim``: the
    width the targets need. Raises :class:`ModelError` naming ``model.target`` and the reason."""
    name = model.target
    if model.n_params == 0:
        raise ModelError(f"{name} has no trainable parameters (requires_grad=True): nothing to take a Hessian of")
    dropouts = [n or type(model.module).__name__ for n, m in model.module.named_modules()
                if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout)) and m.training and m.p > 0]
    if dropouts:
        raise ModelError(f"{name} has active dropout in model.buffers={model.buffers} mode ({', '.join(dropouts)}): "
                         "the loss would be random, not a function of θ; use model.buffers=eval or p=0")
    before = {n: b.clone() for n, b in model._constants(X.device, X.dtype).items()}
    out = model.forward(theta, X)
    if tuple(out.shape) != (X.shape[0], out_dim):
        raise ModelError(f"{name} returns outputs of shape {tuple(out.shape)} for {X.shape[0]} samples; the data "
                         f"need [{X.shape[0]}, {out_dim}] (model.kwargs sets the module's sizes; data.n_classes the "
                         f"number of classes of a user's integer labels)")
    first, second = loss_fn(theta), loss_fn(theta)
    if not torch.equal(first, second):
        raise ModelError(f"{name}: its loss at the same θ differed between two evaluations ({float(first)!r} vs "
                         f"{float(second)!r}): random numbers inside forward; the loss must be a function of θ")
    changed = [n for n, b in model._constants(X.device, X.dtype).items() if not torch.equal(b, before[n])]
    if changed:
        raise ModelError(f"{name}: forward changes its buffers ({', '.join(changed)}), so the loss depends on "
                         "how often it was evaluated")
    try:
        vmap(grad(loss_fn))(torch.stack([theta, theta]))
    except Exception as err:  # noqa: BLE001 — any failure here is the reason to refuse
        raise ModelError(f"{name} does not run under torch.func.vmap, which the Hessian build needs "
                         f"(data-dependent Python control flow, .item(), in-place ops on inputs?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not math.isfinite(float(first)):
        raise ModelError(f"{name}: the loss at the initial θ is {float(first)}")

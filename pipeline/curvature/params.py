"""Parameter subsets: the Hessian with respect to some of a model's parameters, the rest held fixed.

A model names the pieces of its flat θ through ``segments()`` — ``(name, start, size)`` in order
(a user's module: its ``named_parameters`` names; the built-in MLP and CNN: ``layers.<k>.weight`` and
so on). ``hessian.params`` picks some: a regular expression searched in each name (``^head\\.``,
``fc3|fc4``), or a list of exact names. The loss of the subset ``t`` ``[M]`` at a point ``θ`` is
``L(θ with θ_S = t)``: its Hessian is exactly the ``S × S`` block of the full Hessian at ``θ``, and its
value is the full loss (the L2 penalty over all of θ included).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ALL = "all"


class ParamsError(ValueError):
    """``hessian.params`` names no parameter, or a name the model does not have."""


@dataclass(frozen=True)
class ParamSubset:
    """The entries of θ a Hessian is taken over: ``index`` ``[M]`` (int64, ascending) and their names."""

    index: torch.Tensor
    names: tuple
    spec: str  # the hessian.params value, as recorded in the tables

    @property
    def n_params(self) -> int:
        return int(self.index.numel())

    def take(self, theta: torch.Tensor) -> torch.Tensor:
        """θ_S ``[..., M]`` of ``theta`` ``[..., N]``."""
        return theta[..., self.index.to(theta.device)]

    def put(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``theta`` ``[N]`` with θ_S = ``t`` ``[M]``."""
        return theta.index_copy(0, self.index.to(theta.device), t.to(theta.dtype))


def spec_text(spec: Any) -> str:
    """``hessian.params`` as one string for the tables: ``all``, the regex, or a JSON list of names."""
    if spec is None or spec == ALL:
        return ALL
    if isinstance(spec, str):
        return spec
    return json.dumps(list(spec))


def select(segments: list[tuple[str, int, int]], spec: Any) -> Optional[ParamSubset]:
    """The subset ``spec`` picks from a model's ``segments`` (None: all parameters, ``spec`` None or
    ``all``). Raises :class:`ParamsError` naming the regex that matches nothing, or the unknown names,
    with the names the model has."""
    if spec is None or spec == ALL:
        return None
    names = [n for n, _, _ in segments]
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ParamsError(f"hessian.params={spec!r} is not a regular expression: {err}") from None
        chosen = [n for n in names if pattern.search(n)]
        if not chosen:
            raise ParamsError(f"hessian.params={spec!r} matches no parameter; the model has {names}")
    else:
        chosen = list(spec)
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise ParamsError(f"hessian.params={chosen!r}: no parameter(s) {unknown} in the model; it has {names}")
    wanted = set(chosen)
    index = torch.cat([torch.arange(start, start + size) for n, start, size in segments if n in wanted])
    return ParamSubset(index, tuple(n for n in names if n in wanted), spec_text(spec))


@dataclass(frozen=True, eq=False)
class SubsetLoss:
    """``t`` ``[M]`` ↦ ``loss(θ with θ_S = t)``: a loss term over the subset at the point ``base`` ``[N]``
    (vmappable in ``t`` when ``loss`` is in θ). Offers no closed-form Hessian."""

    loss: Callable[[torch.Tensor], torch.Tensor]
    base: torch.Tensor
    subset: ParamSubset

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.loss(self.subset.put(self.base, t))


def restrict(terms, base: torch.Tensor, subset: ParamSubset) -> list[tuple[float, SubsetLoss]]:
    """Weighted loss terms ``[(w, f)]`` of θ as terms of θ_S at the point ``base`` ``[N]`` (on the terms'
    device and dtype)."""
    return [(w, SubsetLoss(f, base.detach(), subset)) for w, f in terms]

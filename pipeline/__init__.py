"""minratio: the share of positive Hessian eigenvalues (the minimum ratio) where training stalls.

The package is four layers, each a folder, imports only going down (``tests/test_layers.py``):
``numerics`` (Lanczos, Chebyshev, block LDLᵀ, cuSOLVER), ``curvature`` (data, models, the loss of flat θ,
HVPs, the Hessian and its counts), ``landscape`` (stalls, critical points, refinement, fits) and
``orchestration`` (config, Ray tasks, tables, analysis, the command line).

The public API is re-exported here, imported on first use so that ``import pipeline`` stays light (names
that are also module names, such as ``hessian`` or ``refine``, are left to their layer's package)::

    from pipeline import spectrum_at, make_problem
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # the Hessian's spectrum and counts at a point, and many points in one pass
    "spectrum_at": "pipeline.curvature.hessian",
    "spectra_at_many": "pipeline.curvature.hessian",
    "SpectrumResult": "pipeline.curvature.hessian",
    # a run's model, data and loss as a function of flat θ; a user's nn.Module
    "make_problem": "pipeline.curvature.problem",
    "Problem": "pipeline.curvature.problem",
    "TorchModel": "pipeline.curvature.torch_model",
    "restore": "pipeline.curvature.torch_model",
    # counts, tolerance and labels of a spectrum
    "summarize": "pipeline.curvature.spectrum",
    "Counts": "pipeline.curvature.spectrum",
    # a whole sweep from a composed Hydra config
    "run_sweep": "pipeline.orchestration.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

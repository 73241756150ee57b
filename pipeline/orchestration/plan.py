"""Stage 2 — sweep plan: the config expanded into runs, ``sweep.seeds`` × the grid of overrides.

Each run carries its own resolved config as one typed object (:class:`pipeline.orchestration.config.RunConfig`),
shipped to its Ray tasks as is, and a ``run_id`` hashed from exactly the values that change what it
computes: the same config gives the same id on any machine, and resources or sweep names do not matter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration.config import (HESSIAN_ID_KEYS, NOT_IN_ID, RUN_SECTIONS, RunConfig, apply_overrides,
                                          grid_points, seeds_of)

# Sections whose values change what a run computes, hence its id. Hessian *resources* do not, and neither
# does `refine` (refined points are keyed by stage=refined: use a new sweep.name to refine differently).
ID_SECTIONS = ("data", "model", "optim", "stall")
# Model keys only a CNN reads: left out of other models' ids, so that MLP runs keep the ids they had
# before the CNN existed (and a sweep started then still resumes).
CNN_ONLY_KEYS = ("conv_layers", "channels", "kernel")
# Keys added later, left out of a run's id while they hold these defaults (the runs of sweeps started before
# they existed keep their ids), and keys that never change what a run computes (where the data sit).
LATER_DEFAULTS = {"model": {"_target_": None, "kwargs": {}, "buffers": "eval"},
                  "data": {"_target_": None, "kwargs": {}, "split": "train", "n_classes": 0},
                  "hessian": {"params": None}}


def in_run_id(key: str) -> bool:
    """Whether the dotted config key ``key`` enters :func:`run_id` (for a model that reads it)."""
    section, _, name = key.partition(".")
    if section == "hessian":
        return name in HESSIAN_ID_KEYS
    return section in ID_SECTIONS and name not in NOT_IN_ID.get(section, ())


@dataclass(frozen=True)
class Run:
    run_id: str
    seed: int
    overrides: dict  # the grid point, {dotted key: value}
    config: RunConfig


def run_id(config: dict, seed: int) -> str:
    """12 hex digits of SHA-256 over the run's computation-relevant config and seed (canonical JSON).
    ``config``: the resolved sections as plain containers, in the grid's spelling (``0`` where a grid wrote
    0 on a float field: the ids of sweeps started before grid points were typed stay as they were)."""
    ident = {s: config[s] for s in ID_SECTIONS}
    if ident["model"].get("name") != "cnn":
        ident["model"] = {k: v for k, v in ident["model"].items() if k not in CNN_ONLY_KEYS}
    ident["hessian"] = {k: config["hessian"].get(k) for k in HESSIAN_ID_KEYS}
    for sec, defaults in LATER_DEFAULTS.items():
        ident[sec] = {k: v for k, v in ident[sec].items()
                      if not (k in defaults and v == defaults[k]) and k not in NOT_IN_ID.get(sec, ())}
    ident["seed"] = int(seed)
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def expand(cfg: DictConfig) -> list[Run]:
    """All runs of a sweep in a stable order (grid point, then seed). ``cfg`` must be validated."""
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True) if cfg.sweep.grid else {}
    runs, seen = [], set()
    for point in grid_points(grid):
        point_cfg = apply_overrides(cfg, point)
        sections = {s: OmegaConf.to_container(point_cfg[s], resolve=True) for s in RUN_SECTIONS}
        typed = RunConfig.from_sections(sections)
        for seed in seeds_of(OmegaConf.to_container(cfg.sweep, resolve=True)["seeds"]):
            same = run_id(_as_floats(sections), seed)  # 1 and 1.0 on a float field are one run
            if same in seen:
                continue  # two grid points that resolve to the same run: compute it once
            seen.add(same)
            runs.append(Run(run_id(sections, seed), seed, point, typed))
    return runs


def _as_floats(x):
    """``x`` with every int (not bool) a float: a key under which spellings of one number are equal."""
    if isinstance(x, dict):
        return {k: _as_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_as_floats(v) for v in x]
    return float(x) if type(x) is int else x

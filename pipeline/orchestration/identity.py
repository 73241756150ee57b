"""One sweep name, one experiment: the config that defines a sweep's runs, recorded in its folder.

A sweep folder ``<results_root>/<sweep.name>/`` holds ``sweep.json``: every setting that changes what a
run computes (data, model, optim, stall, the Hessian's counting settings, refinement), flattened to dotted
keys, apart from the seeds and the keys a grid varies. A later command under the same name whose
settings differ would mix runs of two experiments in one set of tables; it is refused before any work,
naming the keys, unless it says ``sweep.extend=true`` — then the keys it changes join the varied ones.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration.config import (FREE_FORM_KEYS as FREE_FORM, RUN_SECTIONS as SECTIONS, ConfigError,
                                          HessianResources, reads, WHERE_KEYS)
from pipeline.orchestration.plan import in_run_id
from pipeline.orchestration import tables
from pipeline.orchestration.storage import Store

RECORD = "sweep.json"
# Where and how fast a run computes, not what: a sweep may resume on other hardware.
RESOURCE_KEYS = frozenset({*(f"hessian.{f.name}" for f in dataclasses.fields(HessianResources)),
                           "refine.num_cpus", "refine.num_gpus"})
# sweep.json's format: 2 records each free-form dict as one setting; 1 (before 2026-12-07) held one key per
# entry of data.kwargs, and none of model.kwargs.
FORMAT = 2


@dataclass(frozen=True)
class Identity:
    """``fixed``: dotted key -> value (canonical JSON) of every setting shared by the sweep's runs;
    ``varied``: the keys that differ between its runs (grid keys, and keys added with ``sweep.extend``)."""

    fixed: dict
    varied: tuple

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "fixed": self.fixed, "varied": sorted(self.varied)}, indent=1,
                          sort_keys=True)


def _flatten(node, prefix: str = "") -> dict:
    """Dotted key -> canonical JSON of every setting below ``node``; a free-form dict (``model.kwargs``) is
    one setting, so that an argument added, removed or renamed is a difference too."""
    if isinstance(node, dict) and prefix[:-1] not in FREE_FORM:
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def _without(node: dict, paths: list[list[str]]) -> dict:
    """``node`` (nested dicts) without the entries at ``paths`` (each a list of keys)."""
    out = dict(node)
    for path in paths:
        if len(path) == 1:
            out.pop(path[0], None)
        elif isinstance(out.get(path[0]), dict):
            out[path[0]] = _without(out[path[0]], [path[1:]])
    return out


def _strip(fixed: dict, varied) -> dict:
    """``fixed`` with the entries of each free-form dict that ``varied`` names (``model.kwargs.width``, a grid's
    key) taken out of its value, as a varied scalar key is out of ``fixed``."""
    out = dict(fixed)
    for key in FREE_FORM & out.keys():
        inside = [v[len(key) + 1:].split(".") for v in varied if v.startswith(f"{key}.")]
        if inside:
            out[key] = json.dumps(_without(json.loads(out[key]), inside), sort_keys=True)
    return out


def of_config(cfg: DictConfig) -> Identity:
    """The identity of the experiment ``cfg`` (composed and validated) describes."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    varied = tuple(sorted(resolved["sweep"]["grid"] or {}))
    flat = {}
    for name in SECTIONS:
        flat.update(_flatten(resolved[name], f"{name}."))
    fixed = {k: v for k, v in _strip(flat, varied).items() if k not in RESOURCE_KEYS | WHERE_KEYS
             and k not in varied and not _unread(k, resolved, varied)}
    return Identity(fixed, varied)


def _unread(key: str, resolved: dict, varied: tuple) -> bool:
    """A model or data key its kind does not read (``model.conv_layers`` of an MLP, ``data.n_features`` of
    the digits): it changes no run, so it defines nothing. Every key counts where a grid varies the kind."""
    section, _, name = key.partition(".")
    return not reads(section, resolved[section].get("name"), name.split(".")[0]) and f"{section}.name" not in varied


def read(store: Store, sweep: str) -> Identity | None:
    """The identity recorded in the sweep's folder, or None for a new sweep."""
    rel = f"{sweep}/{RECORD}"
    if not store.exists(rel):
        return None
    data = json.loads(store.read_bytes(rel))
    fixed = dict(data["fixed"]) if data.get("format", 1) >= 2 else _from_format_1(data["fixed"])
    return Identity(fixed, tuple(data["varied"]))


def _from_format_1(fixed: dict) -> dict:
    """A record of format 1 as format 2 records it: its ``data.kwargs.<name>`` entries folded into the one
    setting ``data.kwargs`` (none meant ``{}``, where the data kind reads it). It recorded nothing of
    ``model.kwargs``, which the next command's record adds."""
    out, entries = {}, {}
    for key, value in fixed.items():
        if key.startswith("data.kwargs."):
            node = entries
            *path, last = key[len("data.kwargs."):].split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = json.loads(value)
        elif not key.startswith("model.kwargs."):
            out[key] = value
    if entries or ("data.name" in fixed and reads("data", json.loads(fixed["data.name"]), "kwargs")):
        out["data.kwargs"] = json.dumps(entries, sort_keys=True)
    return out


def differences(recorded: Identity, wanted: Identity) -> dict:
    """``{key: (recorded value, wanted value)}`` for the settings both fix and on which they differ."""
    ignore = set(recorded.varied) | set(wanted.varied)
    old, new = _strip(recorded.fixed, ignore), _strip(wanted.fixed, ignore)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if k not in ignore and json.loads(old[k]) != json.loads(new[k])}  # 1 == 1.0


def merged(recorded: Identity | None, wanted: Identity) -> Identity:
    """The record after ``wanted`` joined the sweep: the keys on which they differ become varied ones."""
    if recorded is None:
        return wanted
    varied = set(recorded.varied) | set(wanted.varied) | set(differences(recorded, wanted))
    fixed = _strip({**wanted.fixed, **recorded.fixed}, varied)
    return Identity({k: v for k, v in fixed.items() if k not in varied}, tuple(sorted(varied)))


def check(store: Store, sweep: str, cfg: DictConfig, planned: Iterable[str] = ()) -> Identity:
    """Refuse ``cfg`` when the sweep's folder records another experiment (unless ``sweep.extend``), or
    when an extension would add nothing: no setting of a run's id differs and every run id in ``planned``
    (the command's runs) is in the folder already. Return the record to :func:`save` once the command is
    under way. Reads only; writes nothing."""
    recorded, wanted = read(store, sweep), of_config(cfg)
    diff = differences(recorded, wanted) if recorded else {}
    if not diff:
        return merged(recorded, wanted)
    shown = "; ".join(f"{k}={json.loads(new)!r} here, {json.loads(old)!r} there" for k, (old, new) in
                      list(diff.items())[:8]) + ("; …" if len(diff) > 8 else "")
    # the name after what the command chose (refine.method), not a key that came with the choice (max_iters)
    key = next((k for k in diff if k.rsplit(".", 1)[-1] in ("name", "method")), next(iter(diff)))
    value = json.loads(diff[key][1])
    part = ("-".join(f"{k}-{v}" for k, v in sorted(value.items())) or "none" if isinstance(value, dict)
            else f"{key.split('.')[-1].strip('_')}-{value}")
    # a folder name that no path, URI or glob reads as syntax (as multirun names are made)
    name = re.sub(r"[^\w.,+-]", "_", f"{sweep}-{part}")
    if not cfg.sweep.extend:
        raise ConfigError(
            f"sweep.name={sweep!r} already holds runs of another config ({len(diff)} setting(s) differ: "
            f"{shown}). Give this experiment its own name, e.g. sweep.name={name}, or add sweep.extend=true "
            "to add its runs to the same tables")
    if not any(adds_work(k, old) for k, (old, _) in diff.items()) and set(planned) <= known_runs(store, sweep):
        raise ConfigError(
            f"sweep.extend=true would add nothing to sweep.name={sweep!r}: the settings that differ ({shown}) do "
            "not enter a run's id, and every run this command plans is in the folder already, computed as it "
            f"was there. Give this experiment its own name, e.g. sweep.name={name}")
    return merged(recorded, wanted)


def known_runs(store: Store, sweep: str) -> set:
    """The run ids the sweep's ``runs`` table holds (none for a new sweep)."""
    return set(tables.read(store, sweep, "runs", columns=[]).column("run_id").to_pylist())


def adds_work(key: str, recorded_value: str) -> bool:
    """Whether a command differing from the sweep's record in ``key`` (recorded as ``recorded_value``, JSON)
    plans work the folder lacks: a key of the run id makes new runs, and a refinement method where the
    sweep had none adds refined points; any other key (``hessian.estimate_probes``, ``refine.gtol2``)
    would leave the folder's runs and points as they are."""
    return in_run_id(key) or (key == "refine.method" and json.loads(recorded_value) == "none")


def save(store: Store, sweep: str, identity: Identity) -> None:
    """Write the sweep's record (atomically: a reader sees the old or the new one)."""
    store.write_bytes(f"{sweep}/{RECORD}", identity.to_json().encode())

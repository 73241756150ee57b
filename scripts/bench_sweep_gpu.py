"""Benchmark: a whole sweep on one GPU machine, its training, Hessian and refinement tasks sharing the GPU.

``+experiment=lecture_digits`` with its tasks sharing the GPU by fractions (``ray.train_num_gpus`` =
``--train-fraction``, by default one share per CPU so that every core's training task fits on the card;
``hessian.num_gpus`` = ``refine.num_gpus`` = ``--fraction``) — runs/min and checkpoints/min against the
2-core CPU figure, and the GPU's utilisation sampled once a second by nvidia-smi. ``--train-fraction 0``
trains on the CPU cores instead.

On one local Ray started here with every CPU and the GPU:

1. a warm-up sweep of ``--warm-seeds`` seeds (two runs each: the experiment's lr 0.1 and 0.5): it starts
   the workers and their CUDA contexts, and gives the cost of a run;
2. the measured sweep, its seeds sized from the warm-up's cost per run (:func:`seeds_for`) to end within
   what is left of ``--seconds``.
   Both run to their end, so every run's points are in the tables.

Printed: wall time, runs and points (stalled/final + refined), runs/min and checkpoints/min and their ratio
to the 2-core CPU figure, then where the time went — training task-seconds over (CPUs × wall), the
Hessian and refinement tasks' seconds over (GPU slots × wall), nvidia-smi's utilisation (mean, median,
max) and memory during the measured sweep — and which of them bounds the rate. ``--fraction 0`` runs the
same sweeps with no GPU (a CPU figure for the same machine). With a fraction > 0 and no CUDA it prints one
line and exits 0. A benchmark, not a test: nothing asserts.

    python scripts/bench_sweep_gpu.py                                   # about 3 minutes on a GPU machine
    python scripts/bench_sweep_gpu.py --seconds 120 --smi-log smi.csv
    python scripts/bench_sweep_gpu.py --train-fraction 0                # training on the CPU cores
    python scripts/bench_sweep_gpu.py --fraction 0 --seconds 60 optim.max_steps=2000 stall.window=500

Target (issue 20): ≥ 10× the CPU throughput per machine.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The 2-core CPU figure (README): +experiment=lecture_digits sweep.seeds=100 — 200 runs, 400 points — in
# 64 min on 2 cores, with refine.operator=hvp (refine.operator=auto has since halved the refinement time).
CPU_RUNS, CPU_POINTS, CPU_MINUTES = 200, 400, 64.0


class GpuSampler:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used -l 1`` in the background: (host time, util %,
    MiB) samples, each line also written to ``log`` (CSV). Does nothing where nvidia-smi is missing."""

    def __init__(self, log: Path | None):
        self.samples: list[tuple[float, float, float]] = []
        self.proc, self.log = None, log
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-l", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.fh = open(log, "w") if log else None
        if self.fh:
            self.fh.write("unix_time,utilization_gpu_percent,memory_used_mib\n")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(",")[:2])
            except ValueError:  # "[N/A]" or a partial line
                continue
            now = time.time()
            self.samples.append((now, util, mem))
            if self.fh:
                self.fh.write(f"{now:.1f},{util:g},{mem:g}\n")
                self.fh.flush()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)
            if self.fh:
                self.fh.close()


def sweep(root: Path, name: str, seeds: int, fraction: float, train_fraction: float, extra: list[str]):
    """Run one complete sweep of the experiment on the Ray this process started; (summary, seconds)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_config  # the real config, from the package or from the source tree

    from pipeline.orchestration.sweep import run_sweep

    cfg = compose_config(["+experiment=lecture_digits", f"results_root={root}", f"sweep.name={name}",
                          f"sweep.seeds={seeds}", f"hessian.num_gpus={fraction:g}", f"refine.num_gpus={fraction:g}",
                          f"ray.train_num_gpus={train_fraction:g}", "figures=false", "sweep.progress=none", *extra], shrink=False)
    t0 = time.perf_counter()
    summary = run_sweep(cfg)
    return summary, time.perf_counter() - t0


def where_time_went(folder: Path) -> dict:
    """Seconds inside training tasks and inside GPU tasks (Hessian passes and refinements), from the tables."""
    import pandas as pd

    runs, points = pd.read_parquet(folder / "runs"), pd.read_parquet(folder / "points")
    refined = points["stage"] == "refined"
    return {"runs_ok": int((runs["status"] == "ok").sum()), "points_ok": int((points["status"] == "ok").sum()),
            "points_failed": int((points["status"] == "failed").sum()),
            "train_s": float(runs["wall_seconds"].sum()), "hessian_s": float(points.loc[~refined, "seconds"].sum()),
            "refine_s": float(points.loc[refined, "seconds"].sum()),
            "devices": sorted(points["device"].dropna().unique().tolist()) if "device" in points else [],
            "train_devices": sorted(runs["device"].dropna().unique().tolist()) if "device" in runs else [],
            "longest_run_s": float(runs["wall_seconds"].max()), "longest_point_s": float(points["seconds"].max())}


def seeds_for(w: dict, cpus: int, fraction: float, train_fraction: float, seconds: float) -> int:
    """Seeds (two runs each) that the machine gets through in ``seconds`` at the per-run costs of the warm-up
    ``w``: each run holds a core (and a training GPU slot, 1/``train_fraction`` of them) while it trains, and
    a core and a GPU slot (1/``fraction`` of them) while its points are analysed; the last run's own time
    (the tail) is kept free, and a quarter in reserve."""
    runs = max(w["runs_ok"], 1)
    train, gpu = w["train_s"] / runs, (w["hessian_s"] + w["refine_s"]) / runs
    rate = cpus / max(train + gpu, 1e-3)  # runs/s that the cores allow
    if fraction:
        rate = min(rate, (1 / fraction) / max(gpu, 1e-3))  # and the GPU slots
    if train_fraction:
        rate = min(rate, (1 / train_fraction) / max(train, 1e-3))  # and the training tasks' GPU slots
    tail = w["longest_run_s"] + w["longest_point_s"]
    return max(1, int(0.75 * max(seconds - tail, 0.0) * rate / 2))


def bound(train_share: float, slot_share: float, util: float | None) -> str:
    """Which resource limits the rate, from the shares of their capacity that the sweep used."""
    if train_share >= 0.75:
        return "training (training tasks hold most of the cores' time, each holding a core wherever it trains)"
    if slot_share >= 0.75 and (util is None or util < 50):
        return ("the GPU tasks' host side: their GPU slots are held most of the time while the SMs are mostly idle "
                "(small kernels, launch-bound)")
    if util is not None and util >= 70:
        return "the GPU itself (its utilisation is high)"
    return "neither the cores nor the GPU is full: scheduling, the driver and the sweep's tail (the last runs)"


def report(fraction: float, cpus: int, wall: float, w: dict, samples: list) -> None:
    """Print the rates, where the time went, the GPU's utilisation and what bounds the rate."""
    slots = 1 / fraction if fraction else 0
    rpm, ppm = 60 * w["runs_ok"] / wall, 60 * w["points_ok"] / wall
    cpu_rpm, cpu_ppm = CPU_RUNS / CPU_MINUTES, CPU_POINTS / CPU_MINUTES
    print(f"{w['runs_ok']} runs ok, {w['points_ok']} points ok ({w['points_failed']} failed) in "
          f"{wall:.1f} s; trained on {', '.join(w['train_devices']) or '?'}, analysed on {', '.join(w['devices']) or '?'}")
    print(f"throughput: {rpm:.1f} runs/min ({rpm / cpu_rpm:.1f}× the 2-core CPU's {cpu_rpm:.2f}), "
          f"{ppm:.1f} checkpoints/min ({ppm / cpu_ppm:.1f}× its {cpu_ppm:.2f}) — target ≥ 10×")
    train_share = w["train_s"] / (cpus * wall)
    gpu_s = w["hessian_s"] + w["refine_s"]
    print(f"training: {w['train_s']:.0f} task-s = {100 * train_share:.0f} % of {cpus} cores × wall")
    slot_share = gpu_s / (slots * wall) if slots else 0.0
    print(f"Hessian tasks {w['hessian_s']:.0f} s + refinement tasks {w['refine_s']:.0f} s"
          + (f" = {100 * slot_share:.0f} % of {slots:g} GPU slots × wall" if slots else " (on the CPU)"))
    util = None
    if samples:
        utils, mems = [s[1] for s in samples], [s[2] for s in samples]
        util = statistics.fmean(utils)
        print(f"nvidia-smi, {len(samples)} samples: utilisation mean {util:.0f} %, median "
              f"{statistics.median(utils):.0f} %, max {max(utils):.0f} %, non-zero in "
              f"{100 * sum(u > 0 for u in utils) / len(utils):.0f} % of samples; memory used max {max(mems):,.0f} MiB")
    elif fraction:
        print("nvidia-smi: no samples (not found, or it printed none)")
    print(f"bound by: {bound(train_share, slot_share, util)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=170, help="time for both sweeps together (the measured one "
                    "is sized to end within it)")
    ap.add_argument("--fraction", type=float, default=0.25, help="GPU share of each Hessian and refinement task "
                    "(0: no GPU)")
    ap.add_argument("--train-fraction", type=float, default=None, help="GPU share of each training task "
                    "(ray.train_num_gpus; default 1/--cpus to 4 decimals, Ray's precision: one share per core; "
                    "0: train on the CPU)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    ap.add_argument("--warm-seeds", type=int, default=0, help="seeds of the warm-up sweep (default: CPUs / 2)")
    ap.add_argument("--smi-log", type=Path, default=None, help="write nvidia-smi's samples here (CSV)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sweeps")
    args = ap.parse_args(argv)
    if args.train_fraction is None:
        args.train_fraction = 0.0 if args.fraction == 0 else math.floor(1e4 / args.cpus) / 1e4
    import torch

    if (args.fraction > 0 or args.train_fraction > 0) and not torch.cuda.is_available():
        print(f"bench_sweep_gpu: skipped: no CUDA device (torch.cuda.is_available() is False) for "
              f"hessian.num_gpus=refine.num_gpus={args.fraction:g}, ray.train_num_gpus={args.train_fraction:g}; "
              "--fraction 0 --train-fraction 0 runs the sweeps on the CPU")
        return 0
    import ray

    gpus = 1 if args.fraction > 0 or args.train_fraction > 0 else 0
    name = torch.cuda.get_device_name() if gpus else "no GPU"
    print(f"# bench_sweep_gpu: +experiment=lecture_digits on {args.cpus} CPUs + {name}; training tasks "
          f"{args.train_fraction:g} GPU each, Hessian and refinement tasks {args.fraction:g} GPU each; torch "
          f"{torch.__version__}, ray {ray.__version__}; extra overrides {args.overrides}", flush=True)
    ray.init(address="local", num_cpus=args.cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    sampler = GpuSampler(args.smi_log) if gpus else None
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sweep-gpu-") as tmp:
            warm_seeds = args.warm_seeds or max(1, args.cpus // 2)
            t0 = time.time()
            s, t_warm = sweep(Path(tmp), "warm", warm_seeds, args.fraction, args.train_fraction, args.overrides)
            print("## warm-up sweep (its rate includes the workers' start-up)")
            report(args.fraction, args.cpus, t_warm, where_time_went(Path(tmp) / "warm"),
                   sampler.window(t0, time.time()) if sampler else [])
            left = args.seconds - (time.perf_counter() - t_start)
            seeds = seeds_for(where_time_went(Path(tmp) / "warm"), args.cpus, args.fraction, args.train_fraction,
                              left)
            if left < 30:
                print(f"# warning: only {left:.0f} s left after the warm-up: the measured sweep is short and its "
                      "rate is mostly start-up and tail; raise --seconds", flush=True)
            print(f"# warm-up: {2 * warm_seeds} runs, {s.points} points in {t_warm:.1f} s; measured sweep: "
                  f"{seeds} seeds ({2 * seeds} runs) for the {left:.0f} s left", flush=True)
            t0 = time.time()
            _, wall = sweep(Path(tmp), "measured", seeds, args.fraction, args.train_fraction, args.overrides)
            print("## measured sweep")
            samples = sampler.window(t0, time.time()) if sampler else []
            report(args.fraction, args.cpus, wall, where_time_went(Path(tmp) / "measured"), samples)
    finally:
        if sampler:
            sampler.stop()
        ray.shutdown()
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

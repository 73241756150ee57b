"""Benchmark the sweep driver: parallel efficiency and Ray overhead per task, and the driver's memory.

1. The same ``--runs`` small runs (training + Hessians) done twice: sequentially in this process (the
   job functions called directly, one torch thread, as a Ray task uses) and as a sweep on a local Ray
   with warm workers. Parallel efficiency = T_sequential / (cores × T_sweep). Ray overhead per task =
   (cores × T_sweep − time spent inside the tasks) / tasks: the core time per task lost to scheduling,
   transfers and the driver. The time inside the tasks comes from the tables (``runs.wall_seconds`` and
   ``points.seconds``); when it is larger in the sweep than in the sequential run, the tasks were slowed
   by CPU contention (Ray's own processes, other users of the machine), not by Ray's scheduling: the
   ratio is printed as "in-task slow-down", with the load average.
2. The driver's peak memory (RSS) for sweeps of tiny runs of increasing size (``--memory-runs``), each
   in a fresh process with its own local Ray: flat means the peak does not grow with the number of runs.

    python scripts/bench_sweep.py                      # 64 runs; memory at 64 and 1,024 runs
    python scripts/bench_sweep.py --runs 16 --memory-runs 64 256

Targets (issue 5): efficiency ≥ 85 % of the ideal speed-up, overhead < 50 ms per task, flat driver memory.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Small runs: about 0.3 s of training each on one core, plus their Hessians (226 parameters).
SMALL = ["optim.max_steps=1200", "stall.window=300", "hessian.batch_checkpoints=8", "figures=false",
         "sweep.progress=none"]
# Tiny runs for the memory test: the driver's bookkeeping dominates, not the work.
TINY = ["model.width=2", "optim.max_steps=20", "stall.window=10", "hessian.batch_checkpoints=8",
        "figures=false", "sweep.progress=none"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.orchestration.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("pipeline.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def device_name() -> str:
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model})"


def sequential(cfg) -> tuple[float, int]:
    """The sweep's work without Ray: every training job, then the Hessian jobs in the same batches."""
    import torch

    from pipeline.orchestration import jobs
    from pipeline.orchestration.plan import expand
    from pipeline.orchestration.storage import Store

    torch.set_num_threads(1)
    store = Store.open(str(cfg.results_root))
    name = str(cfg.sweep.name)
    t0 = time.perf_counter()
    groups, tasks = collections.defaultdict(list), 0
    for run in expand(cfg):
        _, refs = jobs.train_job(store.uri, name, run)
        tasks += 1
        for ref in refs:
            groups[ref.group].append(ref)
    size = cfg.hessian.batch_checkpoints
    for refs in groups.values():
        for i in range(0, len(refs), size):
            jobs.hessian_job(store.uri, name, refs[i:i + size])
            tasks += 1
    return time.perf_counter() - t0, tasks


def efficiency(n_runs: int, root: Path) -> dict:
    import ray

    from pipeline.orchestration.sweep import run_sweep

    cores = os.cpu_count() or 1
    # Both sides warm: first calls pay for data loading and PyTorch's lazy set-up, once per process.
    sequential(compose([f"results_root={root}", "sweep.name=seqwarm", f"sweep.seeds={cores}", *SMALL]))
    t_seq, tasks = sequential(compose([f"results_root={root}", "sweep.name=seq", f"sweep.seeds={n_runs}",
                                       *SMALL]))
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        # Warm the workers (process start and imports are paid once per worker, not per task).
        run_sweep(compose([f"results_root={root}", "sweep.name=warm", f"sweep.seeds={2 * cores}", *SMALL]))
        t0 = time.perf_counter()
        summary = run_sweep(compose([f"results_root={root}", "sweep.name=par", f"sweep.seeds={n_runs}",
                                     *SMALL]))
        t_par = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert summary.run_status.get("ok") == n_runs, summary.run_status
    inside_seq, inside_par = in_task_seconds(root / "seq"), in_task_seconds(root / "par")
    return {"runs": n_runs, "tasks": tasks, "cores": cores, "t_sequential_s": t_seq, "t_sweep_s": t_par,
            "speedup": t_seq / t_par, "efficiency": t_seq / (cores * t_par),
            "overhead_ms_per_task": 1e3 * (cores * t_par - inside_par) / tasks,
            "in_task_slowdown": inside_par / inside_seq}


def in_task_seconds(folder: Path) -> float:
    """Seconds spent inside training jobs and Hessian passes, from a sweep's tables."""
    import pandas as pd

    return float(pd.read_parquet(folder / "runs")["wall_seconds"].sum()
                 + pd.read_parquet(folder / "points")["seconds"].sum())


def memory_child(n_runs: int, root: str) -> None:
    """Run a sweep of ``n_runs`` tiny runs in this fresh process; print the driver's RSS as JSON."""
    from pipeline.orchestration.sweep import run_sweep

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    cfg = compose([f"results_root={root}", "sweep.name=mem", f"sweep.seeds={n_runs}", "ray.num_cpus=2", *TINY])
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.2):
            samples.append(rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    summary = run_sweep(cfg)
    done.set()
    print(json.dumps({"runs": n_runs, "ok": summary.run_status.get("ok", 0), "seconds": time.perf_counter() - t0,
                      "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_end_mb": rss_mb(), "rss_median_mb": sorted(samples)[len(samples) // 2]}))


def memory(sizes: list[int], root: Path) -> list[dict]:
    out = []
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(n), str(root / f"mem{n}")],
                              cwd=REPO, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {n} runs failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=64, help="runs in the efficiency comparison")
    p.add_argument("--memory-runs", type=int, nargs="*", default=[64, 1024], help="sweep sizes for memory")
    p.add_argument("--child-memory", nargs=2, metavar=("N", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        memory_child(int(args.child_memory[0]), args.child_memory[1])
        return
    print(f"device: {device_name()}; load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        if args.runs:
            e = efficiency(args.runs, Path(tmp))
            print(f"{e['runs']} runs, {e['tasks']} tasks on {e['cores']} cores: sequential "
                  f"{e['t_sequential_s']:.1f}s, sweep {e['t_sweep_s']:.1f}s -> speed-up {e['speedup']:.2f}x, "
                  f"parallel efficiency {100 * e['efficiency']:.0f}% (target >= 85%), "
                  f"Ray overhead {e['overhead_ms_per_task']:.0f} ms/task (target < 50); in-task slow-down "
                  f"{e['in_task_slowdown']:.2f}x from CPU contention (load average now {os.getloadavg()[0]:.1f})")
        if args.memory_runs:
            rows = memory(args.memory_runs, Path(tmp))
            for r in rows:
                print(f"driver memory, {r['runs']:>5} tiny runs ({r['seconds']:.0f}s): RSS median while running "
                      f"{r['rss_median_mb']:.0f} MB, peak {r['rss_peak_mb']:.0f} MB, after reading the tables "
                      f"{r['rss_end_mb']:.0f} MB")
            if len(rows) > 1:
                a, b = rows[0], rows[-1]
                for key, what in (("rss_median_mb", "median RSS while running"), ("rss_peak_mb", "peak RSS")):
                    print(f"{what}, {b['runs']} vs {a['runs']} runs: ratio {b[key] / a[key]:.2f} "
                          f"({b[key] - a[key]:+.0f} MB for {b['runs'] / a['runs']:.0f}x the runs)")


if __name__ == "__main__":
    main()

"""Cluster mode on this one machine: a real multi-node Ray cluster with a GPU node, ``ray job submit``
against a ``ray start --head`` on non-default ports, and bad requests refused before any work starts.

A process can hold one Ray only, and the pytest process holds the session's shared local Ray, so each
cluster runs in a child process: this file run as a script (``python tests/test_cluster.py …``).
Every process a test starts is stopped by its process group, never by name (``ray stop`` would stop
other people's Ray too).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.orchestration import tables
from pipeline.orchestration.config import ConfigError
from pipeline.orchestration.plan import expand

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Tiny runs: the point is where tasks go and what the tables hold, not the science.
TINY = ["model.width=4", "optim.max_steps=600", "stall.window=200", "sweep.seeds=4", "sweep.progress=plain",
        "hessian.batch_checkpoints=2", "figures=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_tables_complete(cfg, folder: Path) -> dict:
    """Every run has one ok row; every checkpoint file one ok point and one spectrum; no key twice."""
    dfs = {name: pd.read_parquet(folder / name) for name in tables.TABLES}
    for name, df in dfs.items():
        assert not df.duplicated(list(tables.KEYS[name])).any(), f"duplicate keys in {name}"
    runs, points = dfs["runs"], dfs["points"]
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in expand(cfg))
    assert set(runs["status"]) == {"ok"}
    n_files = sum(len(list(p.glob("*.pt"))) for p in (folder / "checkpoints").iterdir())
    assert len(points) == runs["n_checkpoints"].sum() == n_files == len(dfs["spectra"])
    assert set(points["status"]) == {"ok"}
    assert len(dfs["curves"]) == sum(s // cfg.optim.log_every + 1 for s in runs["steps"])
    return dfs


# --------------------------------------------------------------------------------------------------
# One cluster (ray.cluster_utils.Cluster) for three sweeps: a CPU-only head, a GPU node, and a CPU node that
# is removed during the first sweep; the third ships a user's package with ray.runtime_env.

SHARED_GPU = ["ray.train_num_gpus=0.5", "hessian.num_gpus=0.5", "sweep.seeds=2"]

SHIPPED = """from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)
"""


def cluster_child(root: str, out: str) -> None:
    """Sweep ``multi`` starts on a CPU-only cluster with Hessian tasks asking for a whole GPU and
    ``ray.autoscaler=true``: they wait until a GPU node joins after the first run (as an autoscaler's
    would), and a CPU node dies mid-sweep. Then sweep ``shared`` on the two nodes left: training and
    Hessian tasks each ask for half of the GPU. Then sweep ``shipped``: a user's package that lives in a
    folder only this driver's sys.path names (not PYTHONPATH, not the working directory, both of which Ray
    passes on to workers), shipped to both nodes with ``ray.runtime_env.py_modules``; a task without that
    runtime_env cannot import it."""
    import ray
    from ray.cluster_utils import Cluster

    from conftest import compose_config
    from pipeline.orchestration.config import ConfigError
    from pipeline.orchestration.sweep import connect, preflight, run_sweep

    # The head has the most CPUs and is the driver's node: a task asking for no GPU would go there.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        multi = [f"results_root={root}", "sweep.name=multi", f"ray.address={cluster.address}", "hessian.num_gpus=1",
                 "ray.state_every_s=0.2", *TINY]
        cfg = compose_config(multi)
        connect(cfg.ray)
        try:  # without ray.autoscaler, no live node with a GPU is refused before work, with a hint
            preflight(cfg)
            refused = ""
        except ConfigError as err:
            refused = str(err)
        # The sweep runs in a thread, as Cluster.add_node must be called from the main thread (signal handlers).
        result = {}
        sweep = threading.Thread(target=lambda: result.update(summary=run_sweep(
            compose_config([*multi, "ray.autoscaler=true"]))), daemon=True)
        sweep.start()
        # The first trained run's checkpoints wait for a GPU (its runs row waits for its points): a GPU node
        # joins, as an autoscaler's would, and a CPU node dies while the sweep runs (its tasks are retried
        # elsewhere).
        curves = Path(root) / "multi" / "curves"
        while not (curves.exists() and any(curves.glob("*.parquet"))) and sweep.is_alive():
            time.sleep(0.1)
        gpu = cluster.add_node(num_cpus=1, num_gpus=1, resources={"gpu_node": 1})
        cluster.remove_node(doomed)
        sweep.join(timeout=300)
        multi = result["summary"]
        shared = run_sweep(compose_config([f"results_root={root}", "sweep.name=shared",
                                           f"ray.address={cluster.address}", *TINY, *SHARED_GPU]))

        package = Path(root).parent / "code" / "shipnets"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(SHIPPED)
        sys.path.insert(0, str(package.parent))  # after the nodes started: their workers do not inherit it

        @ray.remote(num_cpus=0)
        def importable() -> bool:
            try:
                __import__("shipnets")
                return True
            except ModuleNotFoundError:
                return False

        without = ray.get(importable.remote())  # still the driver's connection of the sweeps above
        shipped = run_sweep(compose_config([f"results_root={root}", "sweep.name=shipped",
                                            f"ray.address={cluster.address}", "model=torch",
                                            "model._target_=shipnets.Net", "+model.kwargs={hidden: 5}",
                                            f"+ray.runtime_env={{py_modules: [{package}]}}", *TINY[1:]]))
        Path(out).write_text(json.dumps({"gpu_node": gpu.node_id, "doomed_node": doomed.node_id, "refused": refused,
                                         "points": multi.points,
                                         "shared_points": shared.points, "shipped_points": shipped.points,
                                         "without": without, "with": ray.get(importable.remote()),
                                         "nodes_left": len([n for n in ray.nodes() if n["Alive"]])}))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_sweeps(tmp_path_factory) -> tuple[Path, dict]:
    """The results folder of :func:`cluster_child`'s two sweeps, run in a child process, and what it saw."""
    tmp = tmp_path_factory.mktemp("cluster")
    root, out = tmp / "results", tmp / "out.json"
    proc = subprocess.run([sys.executable, __file__, "cluster", str(root), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, {**json.loads(out.read_text()), "stderr": proc.stderr}


@pytest.mark.slow
def test_hessian_tasks_land_only_on_the_gpu_node_and_a_lost_node_loses_no_row(cluster_sweeps, make_cfg):
    root, info = cluster_sweeps
    cfg = make_cfg(TINY + ["hessian.num_gpus=1"])
    dfs = assert_tables_complete(cfg, root / "multi")
    points = dfs["points"]
    assert info["points"] == len(points) > 0
    assert set(points["node_id"]) == {info["gpu_node"]}  # every Hessian ran on the GPU node
    assert set(points["device"]) == {"cpu"}  # Ray gave a GPU, torch sees none: the task used the CPU
    assert dfs["runs"]["node_id"].notna().all()


@pytest.mark.slow
def test_with_ray_autoscaler_tasks_wait_for_a_node_that_joins_and_without_it_are_refused(cluster_sweeps):
    """``multi`` started with no GPU anywhere: refused before work without ``ray.autoscaler`` (the message
    says so), and with it every Hessian task waited for the GPU node that joined after the first run."""
    root, info = cluster_sweeps
    assert re.match(r"hessian\.num_gpus=1(\.0)? but the Ray cluster has no GPU", info["refused"]), info["refused"]
    assert "set ray.autoscaler=true" in info["refused"]
    points = pd.read_parquet(root / "multi" / "points")
    assert len(points) > 0 and set(points["status"]) == {"ok"} and set(points["node_id"]) == {info["gpu_node"]}
    assert "with ray.autoscaler=true, those tasks wait until the cluster adds a node" in info["stderr"]


@pytest.mark.slow
def test_training_tasks_ask_for_their_gpu_fraction_and_say_where_they_trained(cluster_sweeps, make_cfg):
    """Only the GPU node can hold a task asking for ``ray.train_num_gpus``: every run trains there. Its GPU
    is Ray's bookkeeping, which this CPU build of torch cannot use, so the runs say they trained on the CPU."""
    root, info = cluster_sweeps
    dfs = assert_tables_complete(make_cfg(TINY + SHARED_GPU), root / "shared")
    runs, points = dfs["runs"], dfs["points"]
    assert info["shared_points"] == len(points) > 0
    assert set(runs["node_id"]) == {info["gpu_node"]}  # no run trained on the GPU-less head
    assert set(points["node_id"]) == {info["gpu_node"]}
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert set(runs["device"]) == {expected}, runs["device"].value_counts()


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(grace)
    proc.wait(timeout=30)


def answers_http(port: int) -> bool:
    """Whether an HTTP server answers on 127.0.0.1:``port`` (any status: the dashboard may ask for a token)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# `ray start --head` on non-default ports, then `ray job submit --working-dir . -- minratio-sweep …`, and a
# local sweep's Ray beside that cluster.

@pytest.fixture(scope="module")
def started_head():
    """A ``ray start --head`` cluster with its job server (the dashboard) on free ports: (dashboard port, GCS
    port, environment that finds it: token auth, and RAY_TMPDIR where the head records its address)."""
    gcs, dash, client, agent, agent_grpc = (free_port() for _ in range(5))
    temp_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # RAY_TMPDIR: the head records its address under temp_dir/ray (not /tmp/ray), where a ray.init()
    # with the same RAY_TMPDIR finds it — as one on a head node finds `ray start`'s cluster.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": temp_dir}  # `ray start --head`: token auth
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", "--num-cpus=2",
         # The agent's default port (52365) is taken when another Ray runs here, e.g. the tests' shared one.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not answers_http(dash) and time.monotonic() < deadline:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.2)
        yield dash, gcs, env
    finally:
        stop_group(head)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@pytest.mark.slow
def test_ray_job_submit_runs_the_sweep_on_a_started_cluster(started_head, tmp_path, make_cfg):
    dash, _, env = started_head
    root = tmp_path / "results"
    job = [*TINY, "sweep.seeds=2"]
    submit = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
              "minratio-sweep", f"results_root={root}", "sweep.name=job", "ray=cluster", *job]
    deadline = time.monotonic() + 60
    while True:  # the job server answers a few seconds after the dashboard's HTTP port
        proc = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        if "submitted successfully" in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep 'job': 2 runs" in proc.stdout
    assert_tables_complete(make_cfg(job), root / "job")


def test_a_local_ray_is_started_beside_a_cluster_and_a_later_sweep_gets_the_ray_it_asks_for(started_head):
    """The default ``ray=local`` starts a Ray of its own even where ``ray start`` left a cluster that a bare
    ``ray.init()`` would join (same RAY_TMPDIR), and refuses ``ray.autoscaler=true`` before it starts. The jobs of a Hydra multirun share a process: a job asking for
    another local Ray (here 1 CPU, then 2) gets it rather than the first job's; one asking for the same
    reuses it."""
    _, gcs, env = started_head
    script = """
import ray
from omegaconf import OmegaConf
from pipeline.orchestration.config import ConfigError
from pipeline.orchestration.sweep import connect
try:  # a local Ray has no autoscaler: refused before it starts
    connect(OmegaConf.create({"address": None, "num_cpus": 1, "runtime_env": {}, "autoscaler": True}))
    print("ray.autoscaler=true accepted", ray.is_initialized())
except ConfigError as err:
    print(err, ray.is_initialized())
seen = []
for cpus in (1, 1, 2):
    connect(OmegaConf.create({"address": None, "num_cpus": cpus, "runtime_env": {}}))
    seen.append((int(ray.cluster_resources()["CPU"]), ray.get_runtime_context().get_job_id(),
                 ray.get_runtime_context().gcs_address.rpartition(":")[2]))
print([c for c, _, _ in seen], seen[0][1] == seen[1][1])
print(" ".join(port for _, _, port in seen))
"""
    local_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=local_env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    autoscaler, counts, ports = proc.stdout.strip().splitlines()[-3:]
    assert autoscaler.startswith("ray.autoscaler=true but this sweep starts a local Ray") and autoscaler.endswith(
        " False"), autoscaler
    assert counts == "[1, 1, 2] True", proc.stdout[-2000:]
    assert str(gcs) not in ports.split(), f"a local Ray joined the started cluster (GCS port {gcs}): {ports}"
    assert "existing Ray cluster" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# Bad requests fail before any work starts, naming the bad value.

def test_an_unreachable_address_fails_at_once_naming_it(tmp_path):
    port = free_port()  # nothing listens there any more
    root = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"ray.address=127.0.0.1:{port}",
                           f"results_root={root}", "sweep.seeds=2",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # Ray's own retry loop would run past this
    assert proc.returncode == 2
    assert f"ray.address='127.0.0.1:{port}' is not reachable" in proc.stderr
    assert not (root / "default" / "runs").exists()


@pytest.mark.parametrize("address", ["head-node", "head:port", "ray://", "10.0.0.1:"])
def test_a_malformed_address_is_refused_naming_it(address):
    from pipeline.orchestration.sweep import check_reachable

    with pytest.raises(ConfigError, match=f"ray.address='{re.escape(address)}' is not allowed"):
        check_reachable(address)


def no_work_done(root: Path) -> bool:
    return not any(p.suffix in (".parquet", ".pt") for p in root.rglob("*")) if root.exists() else True


@pytest.mark.parametrize("autoscaler", [False, True])
def test_the_driver_sizes_its_queue_to_the_cluster_and_on_a_growing_one_keeps_cpus_for_training(
        ray_session, make_cfg, tmp_path, autoscaler):
    """Twice the CPUs in flight; with ``ray.autoscaler`` re-sized as nodes join, and analysis tasks (which may
    be waiting for a GPU node) hold at most half of that, so training goes on on the CPUs there are."""
    from pipeline.orchestration.storage import Store
    from pipeline.orchestration.sweep import Driver

    cfg = make_cfg([f"ray.autoscaler={str(autoscaler).lower()}"])
    driver = Driver(cfg, Store.open(str(tmp_path / "results")), "sized", expand(cfg))
    assert driver.cap == 4 and driver.prog.slots == 2  # the session's local Ray: 2 CPUs
    driver.size_to({"CPU": 16.0, "GPU": 2.0})  # what show() does once a second on a growing cluster
    assert driver.cap == 32 and driver.analysis_cap == (16 if autoscaler else 32) and driver.prog.slots == 16
    driver.prog.close()


def test_a_grid_key_that_does_not_exist_fails_before_work(make_cfg, tmp_path):
    from pipeline.orchestration.sweep import run_sweep

    cfg = make_cfg(["+sweep.grid={model.widht:[2,4]}"])
    with pytest.raises(ConfigError, match="model.widht"):
        run_sweep(cfg)
    assert no_work_done(tmp_path / "results")


def test_an_unwritable_results_root_fails_before_work(make_cfg, tmp_path):
    from pipeline.orchestration.sweep import run_sweep

    (tmp_path / "a-file").write_text("")
    cfg = make_cfg([f"results_root={tmp_path / 'a-file' / 'results'}"])
    with pytest.raises(PermissionError, match="a-file/results"):
        run_sweep(cfg)


CLUSTER_CANNOT = [  # (override, what the message must name) on the shared 2-CPU, GPU-less local Ray
    ("hessian.num_gpus=1", "hessian.num_gpus=1"),
    ("hessian.num_gpus=0.25", "hessian.num_gpus=0.25"),
    ("ray.train_num_cpus=64", "ray.train_num_cpus=64"),
    ("ray.train_num_gpus=0.25", "ray.train_num_gpus=0.25 but the Ray cluster has no GPU; use ray.train_num_gpus=0"),
    ("hessian.memory_budget_mb=1e9", "hessian.memory_budget_mb=1e+09"),
    # a Hessian task and its 2 data workers hold 3 CPUs at once: never schedulable on 2
    ("hessian.method=estimate hessian.tol_mode=rel hessian.data_workers=2", "hessian.data_workers=2"),
    ("refine=newton_mr refine.num_gpus=1", "refine.num_gpus=1"),
]


@pytest.mark.parametrize("override,named", CLUSTER_CANNOT)
def test_requests_the_cluster_cannot_meet_fail_before_work(ray_session, make_cfg, tmp_path, override, named):
    from pipeline.orchestration.sweep import run_sweep

    with pytest.raises(ConfigError, match=named.replace("+", r"\+")):
        run_sweep(make_cfg(override.split()))
    assert no_work_done(tmp_path / "results")


def test_resources_of_refinement_are_not_checked_when_there_is_none(ray_session, make_cfg):
    from pipeline.orchestration.sweep import preflight

    preflight(make_cfg(["refine=none", "refine.num_gpus=1"]))  # no refinement task will ask for the GPU


def test_data_parallel_hessian_tasks_are_capped_to_what_the_cluster_holds_at_once(ray_session, make_cfg):
    """Each task waits for its workers while holding its own CPUs: two that together need more than the
    cluster has could wait for each other for ever, so the sweep runs only as many as fit at once."""
    from pipeline.orchestration.sweep import data_parallel_cap

    def cap(workers, cpus):
        return data_parallel_cap(make_cfg(["hessian.method=estimate", f"hessian.data_workers={workers}",
                                           f"hessian.num_cpus={cpus}"]).hessian)

    assert (cap(1, 0.5), cap(3, 0.5), cap(1, 1), cap(2, 1)) == (2, 1, 1, 0)  # the shared Ray has 2 CPUs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fractional_gpus_on_a_real_gpu_run_the_hessians_on_cuda(ray_session, make_cfg, tmp_path):
    from pipeline.orchestration.sweep import run_sweep

    assert ray_session.cluster_resources().get("GPU", 0) >= 1, "Ray did not detect the GPU"

    cfg = make_cfg([*TINY, "sweep.name=gpu", "hessian.num_gpus=0.5"])  # two Hessian tasks share one GPU
    summary = run_sweep(cfg)
    dfs = assert_tables_complete(cfg, tmp_path / "results" / "gpu")
    assert summary.points == len(dfs["points"])
    assert dfs["points"]["device"].str.startswith("cuda").all()


@pytest.mark.slow
def test_a_users_package_shipped_with_runtime_env_py_modules_runs_on_the_cluster(cluster_sweeps):
    root, info = cluster_sweeps
    assert info["without"] is False and info["with"] is True and info["nodes_left"] == 2
    runs = pd.read_parquet(root / "shipped" / "runs")
    points = pd.read_parquet(root / "shipped" / "points")
    assert set(runs["status"]) == {"ok"} and set(runs["model_target"]) == {"shipnets.Net"}
    assert len(runs) == 4 and info["shipped_points"] == len(points) > 0 and set(points["status"]) == {"ok"}
    assert runs["node_id"].nunique() == 2  # both nodes' workers imported the shipped package


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    {"cluster": cluster_child}[sys.argv[1]](*sys.argv[2:])

"""Training on the device of its task (``ray.train_num_gpus`` > 0: ``cuda``): the run is the CPU's run to
float64 rounding, and everything it leaves behind — checkpoints, saved states — holds CPU tensors, so a
retry, a resume or a Hessian task may run on another device. Without CUDA only the CPU cases run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.orchestration import jobs, tables
from pipeline.orchestration.plan import expand
from pipeline.orchestration.storage import Store
from pipeline.orchestration.train import train

# Momentum gives the optimizer a state to carry across devices; a small step keeps float64 rounding
# differences between devices from growing (no edge-of-stability oscillation).
TINY = ["model.width=4", "data.n_samples=200", "optim.lr=0.2", "optim.momentum=0.5", "optim.max_steps=200",
        "stall.window=50", "stall.power_iters=10", "sweep.seeds=1", "figures=false"]
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


def devices_of(obj) -> set:
    """The devices of every tensor in ``obj`` (nested dicts, lists, tuples, dataclass-free)."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        return set().union(*map(devices_of, obj.values()), set())
    if isinstance(obj, (list, tuple)):
        return set().union(*map(devices_of, obj), set())
    return set()


@pytest.fixture
def run(make_cfg, one_thread):
    return expand(make_cfg(TINY))[0]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_run_resumed_on_the_cpu_from_a_state_saved_on_its_device_ends_as_the_uninterrupted_run(
        run, tmp_path, device):
    states = []
    whole = train(run.config, run.seed, device=device, on_state=states.append, state_every_s=0.0)
    assert whole.device.startswith(device) and len(states) > 2
    for st in states:
        assert devices_of([st.theta, st.optimizer, [ck.theta for ck in st.checkpoints]]) == {"cpu"}
    assert states[-1].optimizer["state"][0]["momentum_buffer"].abs().sum() > 0  # there is a state to carry
    store = Store.open(str(tmp_path / "results"))
    middle = states[len(states) // 2]
    jobs.save_state(store, "s", run.run_id, middle)
    resumed = train(run.config, run.seed, device="cpu", resume=jobs.load_state(store, "s", run.run_id))
    assert resumed.device == "cpu" and resumed.steps == whole.steps
    assert [ck.step for ck in resumed.checkpoints] == [ck.step for ck in whole.checkpoints]
    got, want = np.array(resumed.curves.loss), np.array(whole.curves.loss)
    if device == "cpu":  # the same device: bit for bit
        assert np.array_equal(got, want)
        assert torch.equal(resumed.checkpoints[-1].theta, whole.checkpoints[-1].theta)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
        torch.testing.assert_close(resumed.checkpoints[-1].theta, whole.checkpoints[-1].theta, rtol=1e-8, atol=1e-12)


def test_the_runs_row_says_the_run_trained_on_the_cpu(run, tmp_path):
    store = Store.open(str(tmp_path / "results"))
    status, refs = jobs.train_job(store.uri, "cpu", run)
    runs = tables.read(store, "cpu", "runs").to_pandas()
    assert status == "ok" and refs and list(runs["device"]) == ["cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_run_trained_on_cuda_has_the_cpu_runs_curve_and_checkpoints_that_load_on_the_cpu(run, tmp_path):
    store = Store.open(str(tmp_path / "results"))
    out = {device: jobs.train_job(store.uri, device, run, device=device) for device in ("cpu", "cuda")}
    assert out["cpu"][0] == out["cuda"][0] == "ok"
    for sweep, device in (("cpu", "cpu"), ("cuda", "cuda:0")):
        assert list(tables.read(store, sweep, "runs").to_pandas()["device"]) == [device]
    curves = {s: tables.read(store, s, "curves").to_pandas().sort_values("step") for s in ("cpu", "cuda")}
    np.testing.assert_array_equal(curves["cuda"]["step"], curves["cpu"]["step"])
    np.testing.assert_allclose(curves["cuda"]["loss"], curves["cpu"]["loss"], rtol=1e-9, atol=0)
    assert [r.step for r in out["cuda"][1]] == [r.step for r in out["cpu"][1]]
    for on_gpu, on_cpu in zip(out["cuda"][1], out["cpu"][1]):
        # no map_location: a file holding CUDA tensors would come back on the GPU
        saved = torch.load(tmp_path / "results" / on_gpu.path, weights_only=True)
        assert saved["theta"].device.type == "cpu"
        torch.testing.assert_close(saved["theta"], jobs.load_checkpoint(store, on_cpu.path)["theta"],
                                   rtol=1e-8, atol=1e-12)

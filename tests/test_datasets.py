"""Real data-set readers on fixture files written in torchvision's exact on-disk formats (IDX, gzipped or not;
CIFAR-10's pickled batches), read through the real config; a user's data by import path."""
from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from pipeline.curvature import datasets
from pipeline.curvature.datasets import DataError
from pipeline.orchestration.config import ConfigError, validate
from pipeline.curvature.data import make_dataset
from pipeline.orchestration.plan import expand
from pipeline.orchestration.sweep import check_problems

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "usernets")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An IDX file as LeCun's MNIST distribution has them: magic 00 00 08 <ndim>, big-endian int32 sizes, bytes."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + \
        array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def mnist_fixture(root: Path, folder: str = "MNIST", n: int = 40, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    raw = root / folder / "raw"
    for prefix, k in (("train", n), ("t10k", n // 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:k], gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[:k], gz)
    return images, labels


def cifar_fixture(root: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=per_batch))
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": [int(v) for v in labels], "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f, protocol=2)
        if name != "test_batch":
            xs.append(data)
            ys += labels
    return np.concatenate(xs), np.asarray(ys)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader_reads_idx_files(tmp_path, gz):
    images, labels = mnist_fixture(tmp_path, gz=gz)
    X, Y = datasets.load_images("mnist", str(tmp_path))
    assert X.shape == (40, 1, 28, 28) and Y.dtype == np.int64
    assert np.array_equal(X[:, 0] * 255, images) and np.array_equal(Y, labels)
    Xt, _ = datasets.load_images("mnist", str(tmp_path), split="test")
    assert len(Xt) == 20


def test_mnist_through_the_config_downsampled_subset_one_hot_or_classes(tmp_path):
    images, labels = mnist_fixture(tmp_path)
    base = ["data=mnist", f"data.root={tmp_path}", "data.side=7", "data.n_samples=30", "data.standardize=false"]
    cfg = compose_config(base)
    validate(cfg)
    d = make_dataset(cfg.data, 0, "mse")
    assert d.X.shape == (30, 49) and d.sample_shape == (1, 7, 7) and d.Y.shape == (30, 10)
    block = images[0, :4, :4].mean() / 255
    assert d.X[0, 0].item() == pytest.approx(block)
    assert torch.equal(d.Y.argmax(1), torch.as_tensor(labels[:30], dtype=torch.int64))
    ce = make_dataset(compose_config(base + ["model.loss=cross_entropy"]).data, 0, "cross_entropy")
    assert ce.n_classes == 10 and ce.Y.dtype == torch.int64


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    mnist_fixture(tmp_path, folder="FashionMNIST", gz=False)
    cfg = compose_config(["data=fashion_mnist", f"data.root={tmp_path}", "data.n_samples=0", "data.side=14"])
    d = make_dataset(cfg.data, 0, "mse")
    assert d.X.shape == (40, 196) and abs(float(d.X.mean())) < 1e-12  # standardized


def test_cifar10_reader_reads_pickled_batches(tmp_path):
    data, labels = cifar_fixture(tmp_path)
    X, Y = datasets.load_images("cifar10", str(tmp_path))
    assert X.shape == (30, 3, 32, 32)
    assert np.array_equal((X * 255).round().astype(np.uint8).reshape(30, -1), data)
    assert np.array_equal(Y, labels)
    cfg = compose_config(["data=cifar10", f"data.root={tmp_path}", "data.side=8", "data.n_samples=12"])
    d = make_dataset(cfg.data, 0, "cross_entropy")
    assert d.X.shape == (12, 192) and d.sample_shape == (3, 8, 8)


def test_missing_folder_is_refused_before_any_run_naming_it(tmp_path):
    cfg = compose_config(["data=mnist", f"data.root={tmp_path}/nowhere"])
    validate(cfg)
    with pytest.raises(ConfigError, match=f"{tmp_path}/nowhere/MNIST/raw does not exist.*data.download=true"):
        check_problems(expand(cfg))


def test_download_without_torchvision_names_the_package(tmp_path):
    with pytest.raises(datasets.DataError, match="needs torchvision"):
        datasets.load_images("cifar10", str(tmp_path), download_missing=True)


def test_side_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ConfigError, match="data.side=5"):
        validate(compose_config(["data=mnist", "data.side=5"]))


def test_user_data_from_an_import_path():
    cfg = compose_config(["data=torch", "data._target_=usernets.data.blobs", "+data.kwargs={n: 20, classes: 3}",
                          "model.loss=cross_entropy"])
    validate(cfg)
    d = make_dataset(cfg.data, 0, "cross_entropy")
    assert d.X.shape == (20, 16) and d.sample_shape == (1, 4, 4) and d.n_classes == 3
    mse = make_dataset(cfg.data, 0, "mse")
    assert mse.Y.shape == (20, 3)


def test_user_data_as_a_torch_dataset(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(
        "import torch\n"
        "class Pairs(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 6\n"
        "    def __getitem__(self, i): return torch.full((2,), float(i)), torch.tensor([float(i) ** 2])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(["data=torch", "data._target_=userdata.Pairs", "data.standardize=false"])
    d = make_dataset(cfg.data, 0, "mse")
    assert d.X.shape == (6, 2) and d.n_classes == 0 and d.Y[:, 0].tolist() == [0, 1, 4, 9, 16, 25]


def test_user_data_give_their_classes_and_a_wrong_container_is_named(tmp_path, monkeypatch):
    """Classes: data.n_classes, else max label + 1 (labels 2..6 of a 10-class set make 7 without it; a
    Dataset's ``classes`` attribute is not read: it may name classes its relabelled targets no longer
    use, and the run ids of earlier sweeps were computed without it). A list [X, Y] or a dict is named."""
    (tmp_path / "userdata2.py").write_text(
        "import torch\n"
        "X, Y = torch.arange(12.0).reshape(6, 2), torch.tensor([2, 2, 2, 3, 3, 6])\n"
        "class Labelled(torch.utils.data.Dataset):\n"
        "    classes = [str(k) for k in range(10)]\n"
        "    def __len__(self): return 6\n"
        "    def __getitem__(self, i): return X[i], Y[i]\n"
        "def plain(): return X, Y\n"
        "def regression(): return X, X[:, :1]\n"
        "def pairs(): return [(X[i], Y[i]) for i in range(6)]\n"
        "def as_list(): return [X, Y]\n"
        "def as_dict(): return {'X': X, 'Y': Y}\n"
        "def ragged(): return [(X[0], Y[0]), (X[1, :1], Y[1])]\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def data(target: str, *overrides: str, loss: str = "cross_entropy"):
        cfg = compose_config(["data=torch", f"data._target_=userdata2.{target}", f"model.loss={loss}", *overrides])
        validate(cfg)
        return make_dataset(cfg.data, 0, loss)

    assert data("Labelled").n_classes == 7 and data("plain").n_classes == 7 and data("pairs").n_classes == 7
    assert data("Labelled", "data.n_classes=10").n_classes == 10
    assert data("plain", "data.n_classes=10", loss="mse").Y.shape == (6, 10)
    with pytest.raises(DataError, match=r"class labels span \[2, 6\], outside 0\.\.4 for 5 classes"):
        data("Labelled", "data.n_classes=5")
    with pytest.raises(DataError, match=r"data\.n_classes=3 applies to integer class labels"):
        data("regression", "data.n_classes=3", loss="mse")
    with pytest.raises(ConfigError, match="data.n_classes=-1"):
        data("plain", "data.n_classes=-1")
    with pytest.raises(DataError, match=r"returned a list whose item 0 is of shape \(6, 2\), not an \(x, y\) pair"):
        data("as_list")
    with pytest.raises(DataError, match=r"returned dict: expected the tuple \(X, Y\)"):
        data("as_dict")
    with pytest.raises(DataError, match=r"its \(x, y\) pairs differ in shape"):
        data("ragged")

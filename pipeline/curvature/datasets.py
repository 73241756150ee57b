"""Real image data sets read from torchvision's on-disk layout, and a user's data from an import path.

minratio reads the files torchvision writes, with its own small readers (no torchvision needed to read):

- MNIST: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (IDX files, optionally ``.gz``),
- Fashion-MNIST: the same names under ``<root>/FashionMNIST/raw/``,
- CIFAR-10: ``<root>/cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch`` (pickled
  dicts of uint8 ``data`` ``[10000, 3072]``, channel-major 3×32×32 rows, and ``labels``).

``download=True`` asks torchvision's own dataset class to fetch them into exactly that layout (it needs
torchvision installed next to torch); otherwise a missing folder is an error naming it. Images come back
as ``[n, C, H, W]`` float64 in [0, 1] and labels ``[n]`` int64.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Any

import numpy as np

from pipeline.curvature.torch_model import import_object, plain

IMAGE_SETS = {"mnist": ("MNIST", 1, 28), "fashion_mnist": ("FashionMNIST", 1, 28),
              "cifar10": ("cifar-10-batches-py", 3, 32)}  # folder under root, channels, side
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class DataError(ValueError):
    """A data set cannot be read: the message names the folder or file and what to do."""


def read_idx(path: str) -> np.ndarray:
    """The array in an IDX file (``.gz`` or not): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian int32
    sizes, then the data row-major."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} ({int(np.prod(shape))} values), file holds {data.size}")
    return data.reshape(shape)


def _idx_file(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise DataError(f"{os.path.join(folder, stem)}[.gz] is missing")


def folder_of(name: str, root: str) -> str:
    """Where data set ``name`` lives under ``root`` in torchvision's layout."""
    sub = IMAGE_SETS[name][0]
    return os.path.join(root, sub, "raw") if name != "cifar10" else os.path.join(root, sub)


def _mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    return images[:, None].astype(np.float64) / 255.0, labels.astype(np.int64)


def _cifar10(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"{path} is missing")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # the format torchvision's CIFAR10 reads
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
    return np.concatenate(xs).astype(np.float64) / 255.0, np.concatenate(ys)


def download(name: str, root: str) -> None:
    """Fetch ``name`` into ``root`` with torchvision's dataset class (both splits), in the layout read here."""
    try:
        import torchvision.datasets as tvd
    except Exception as err:  # noqa: BLE001 — ImportError, or a torchvision built for another torch
        raise DataError(f"data.download=true needs torchvision (pip install torchvision, the build matching your "
                        f"torch) to fetch {name} into {root}; it could not be imported: {err}") from None
    cls = getattr(tvd, _TORCHVISION[name])
    for train in (True, False):
        cls(root, train=train, download=True)


def load_images(name: str, root: str, split: str = "train", download_missing: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, C, H, W]`` float64 in [0, 1] and labels ``[n]`` int64 of ``name`` (mnist,
    fashion_mnist, cifar10) from ``root``; ``split``: train or test. A missing folder is fetched when
    ``download_missing``, else a :class:`DataError` naming it."""
    if name not in IMAGE_SETS:
        raise DataError(f"unknown image data set {name!r}: expected one of {', '.join(IMAGE_SETS)}")
    if split not in ("train", "test"):
        raise DataError(f"data.split={split!r} is not allowed: expected train or test")
    root = os.path.abspath(os.path.expanduser(root))
    folder = folder_of(name, root)
    if not os.path.isdir(folder):
        if not download_missing:
            raise DataError(f"data.name={name}: folder {folder} does not exist; set data.root to where the data "
                            f"set is, or data.download=true to fetch it there")
        download(name, root)
    return _mnist(folder, split) if name != "cifar10" else _cifar10(folder, split)


def downsample(images: np.ndarray, side: int) -> np.ndarray:
    """``images`` ``[n, C, H, H]`` averaged over blocks to ``[n, C, side, side]`` (``side`` divides H)."""
    n, c, h, _ = images.shape
    if side < 1 or h % side:
        raise DataError(f"data.side={side} must divide the image side {h}")
    f = h // side
    return images.reshape(n, c, side, f, side, f).mean(axis=(3, 5))


def from_target(target: str, kwargs: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, Y)`` as NumPy from the callable at import path ``target`` called with ``kwargs``: it returns the
    tuple ``(X, Y)`` (tensors or arrays, ``X`` ``[n, ...]``) or a ``torch.utils.data.Dataset`` (or a list)
    of ``(x, y)`` pairs."""
    fn = import_object(target)
    if not callable(fn):
        raise DataError(f"data._target_={target!r} is {type(fn).__name__}, not callable")
    out = fn(**plain(kwargs or {}))
    expected = "expected the tuple (X, Y), or a torch.utils.data.Dataset of (x, y) pairs"
    if isinstance(out, tuple) and len(out) == 2:
        X, Y = out
    elif isinstance(out, (dict, str, bytes)) or not (hasattr(out, "__getitem__") and hasattr(out, "__len__")):
        raise DataError(f"data._target_={target!r} returned {type(out).__name__}: {expected}")
    else:
        pairs = [out[i] for i in range(len(out))]
        if not pairs:
            raise DataError(f"data._target_={target!r} returned an empty {type(out).__name__}")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                what = f"of shape {tuple(pair.shape)}" if hasattr(pair, "shape") else type(pair).__name__
                raise DataError(f"data._target_={target!r} returned a {type(out).__name__} whose item {i} is "
                                f"{what}, not an (x, y) pair: {expected}")
        try:
            X, Y = np.stack([_np(p[0]) for p in pairs]), np.stack([_np(p[1]) for p in pairs])
        except ValueError as err:
            raise DataError(f"data._target_={target!r}: its (x, y) pairs differ in shape ({err})") from None
    X, Y = _np(X), _np(Y)
    if X.ndim < 2 or Y.shape[:1] != X.shape[:1]:
        raise DataError(f"data._target_={target!r}: X {X.shape} and Y {Y.shape} need the same first dimension n "
                        "and X at least [n, d]")
    return X, Y


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

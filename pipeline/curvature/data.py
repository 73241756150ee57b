"""Stage 3 — data: data sets generated from a seed, or shipped inside scikit-learn. Nothing is downloaded.

Every data set is a pair of tensors held in memory: inputs ``X`` of shape ``[n, d]`` and targets ``Y`` of
shape ``[n, k]`` (float, for MSE) or ``[n]`` (int64 class labels, for cross-entropy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.curvature import datasets


@dataclass(frozen=True)
class Dataset:
    X: torch.Tensor  # [n, d] inputs
    Y: torch.Tensor  # [n, k] float targets, or [n] int64 labels
    n_classes: int  # 0 for regression
    sample_shape: tuple = ()  # one input's shape as a module receives it (images: (C, H, W)); () = [d]

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.X.shape[1])

    @property
    def out_dim(self) -> int:
        return self.n_classes if self.n_classes else int(self.Y.shape[1])

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "Dataset":
        Y = self.Y.to(device) if self.n_classes else self.Y.to(device, dtype)
        return Dataset(self.X.to(device, dtype), Y, self.n_classes, self.sample_shape)


def _standardize(X: np.ndarray) -> np.ndarray:
    # Constant pixels in the digits (std 0) stay 0 rather than becoming NaN.
    std = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)


def synthetic(seed: int, n_samples: int, n_features: int, n_outputs: int, teacher_width: int,
              noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs ``[n, d]`` labelled by a random one-hidden-layer tanh teacher: targets ``[n, k]``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, n_features))
    W1 = rng.standard_normal((n_features, teacher_width)) / np.sqrt(n_features)
    b1 = 0.5 * rng.standard_normal(teacher_width)
    W2 = rng.standard_normal((teacher_width, n_outputs)) / np.sqrt(teacher_width)
    Y = np.tanh(X @ W1 + b1) @ W2
    if noise > 0:
        Y = Y + noise * rng.standard_normal(Y.shape)
    return X, Y


def gaussian(seed: int, n_samples: int, n_features: int, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Memorisation data: random Gaussian inputs ``[n, d]`` and unrelated Gaussian targets ``[n, k]``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_samples, n_features)), rng.standard_normal((n_samples, n_outputs))


def autoencoder(seed: int, n_samples: int, variances) -> tuple[np.ndarray, np.ndarray]:
    """Linear-autoencoder data whose second moment is exactly ``diag(variances)``: inputs ``[n, d]`` with
    ``XᵀX / n = diag(variances)`` up to rounding, targets = inputs ``[n, d]``.

    With MSE (½‖f(x) − x‖² averaged) a linear autoencoder's loss is then ½·tr[(I − W₂W₁)Σ(I − W₂W₁)ᵀ] with
    Σ = diag(variances), whose critical points are known in closed form (projections onto principal
    components). Gaussian draws, whitened to identity second moment, then scaled. Do not standardize it.
    """
    var = np.asarray(variances, dtype=np.float64)
    if var.ndim != 1 or var.size < 1 or np.any(var <= 0):
        raise ValueError(f"variances must be a non-empty list of positive numbers, got {variances!r}")
    d = var.size
    if n_samples < d:
        raise ValueError(f"need n_samples ≥ {d} (the number of variances) for a full-rank second moment, "
                         f"got {n_samples}")
    Z = np.random.default_rng(seed).standard_normal((n_samples, d))
    w, U = np.linalg.eigh(Z.T @ Z / n_samples)
    X = Z @ (U / np.sqrt(w)) @ U.T * np.sqrt(var)  # Z M^{-1/2}: second moment I, then diag(var)
    return X, X.copy()


def digits(n_samples: int = 0, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digits shipped inside scikit-learn: inputs ``[n, side²]``, labels ``[n]`` in 0..9.

    ``side`` = 4 or 2 averages blocks of pixels (8×8 → 4×4 → 2×2). ``n_samples`` = 0 keeps all 1,797.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float64), bunch.target.astype(np.int64)
    if side not in (2, 4, 8):
        raise ValueError(f"digits side must be 2, 4 or 8, got {side}")
    f = 8 // side
    images = images.reshape(-1, side, f, side, f).mean(axis=(2, 4))
    X = images.reshape(len(images), side * side)
    if n_samples:
        if n_samples > len(X):
            raise ValueError(f"digits has {len(X)} samples, asked for n_samples={n_samples}")
        X, labels = X[:n_samples], labels[:n_samples]
    return X, labels


DATA_NAMES = ("synthetic", "digits", "gaussian", *datasets.IMAGE_SETS, "torch")  # data.name: what make_dataset builds


def make_dataset(data_cfg, run_seed: int, loss: str = "mse") -> Dataset:
    """Build the data set a run trains on, from its data config and the run's seed (float64, CPU)."""
    seed = run_seed if data_cfg.seed is None else int(data_cfg.seed)
    if data_cfg.name == "synthetic":
        X, Y = synthetic(seed, data_cfg.n_samples, data_cfg.n_features, data_cfg.n_outputs,
                         data_cfg.teacher_width, data_cfg.noise)
        n_classes = 0
    elif data_cfg.name == "gaussian":
        X, Y = gaussian(seed, data_cfg.n_samples, data_cfg.n_features, data_cfg.n_outputs)
        n_classes = 0
    elif data_cfg.name == "digits":
        X, labels = digits(data_cfg.n_samples, data_cfg.side)
        n_classes = 10
        Y = labels if loss == "cross_entropy" else np.eye(10)[labels]
        if loss != "cross_entropy":
            n_classes = 0  # one-hot regression targets
    elif data_cfg.name in datasets.IMAGE_SETS or data_cfg.name == "torch":
        return _loaded(data_cfg, loss)
    else:
        raise ValueError(f"unknown data.name {data_cfg.name!r}: expected one of {', '.join(DATA_NAMES)}")
    if data_cfg.standardize:
        X = _standardize(X)
    Yt = torch.as_tensor(Y) if n_classes else torch.as_tensor(Y, dtype=torch.float64)
    shape = (1, data_cfg.side, data_cfg.side) if data_cfg.name == "digits" else ()  # images stay images
    return Dataset(torch.as_tensor(X, dtype=torch.float64), Yt, n_classes, shape)


def _loaded(data_cfg, loss: str) -> Dataset:
    """A real image set (:mod:`pipeline.curvature.datasets`: ``root``, ``download``, ``split``, ``side``) or the user's
    ``data._target_``; first ``n_samples`` (0 = all), inputs kept as flat rows with their ``sample_shape``.
    Integer labels are class targets for cross-entropy and one-hot rows for MSE, as for the digits; a
    user's data have ``data.n_classes`` classes, else max label + 1."""
    if data_cfg.name == "torch":
        X, Y = datasets.from_target(str(data_cfg._target_), getattr(data_cfg, "kwargs", None))
        k = int(getattr(data_cfg, "n_classes", 0))
    else:
        X, Y = datasets.load_images(data_cfg.name, str(data_cfg.root), str(data_cfg.split), bool(data_cfg.download))
        k = 10  # every image set has 10 classes
        if data_cfg.side != X.shape[-1]:
            X = datasets.downsample(X, int(data_cfg.side))
    if data_cfg.n_samples:
        if data_cfg.n_samples > len(X):
            raise ValueError(f"data.n_samples={data_cfg.n_samples} but the data set has {len(X)} samples")
        X, Y = X[:data_cfg.n_samples], Y[:data_cfg.n_samples]
    shape = tuple(int(s) for s in X.shape[1:])
    X = X.reshape(len(X), -1).astype(np.float64)
    if data_cfg.standardize:
        X = _standardize(X)
    if np.issubdtype(Y.dtype, np.integer) and Y.ndim == 1:
        k = k or int(Y.max()) + 1  # classes not configured: the labels seen
        if Y.min() < 0 or Y.max() >= k:
            raise datasets.DataError(f"data.name={data_cfg.name}: class labels span [{Y.min()}, {Y.max()}], outside "
                                     f"0..{k - 1} for {k} classes (data.n_classes sets the number of classes)")
        if loss == "cross_entropy":
            return Dataset(torch.as_tensor(X), torch.as_tensor(Y, dtype=torch.int64), k, shape)
        Y = np.eye(k)[Y]
    elif loss == "cross_entropy":
        raise ValueError(f"model.loss=cross_entropy needs integer class labels [n]; data.name={data_cfg.name} "
                         f"gave targets {Y.dtype} {Y.shape}")
    elif k:
        raise datasets.DataError(f"data.n_classes={k} applies to integer class labels [n]; data.name={data_cfg.name} "
                                 f"gave targets {Y.dtype} {Y.shape}")
    Y = Y.reshape(len(Y), -1)
    return Dataset(torch.as_tensor(X), torch.as_tensor(Y, dtype=torch.float64), 0, shape)


def batches(n: int, batch_size: int) -> list[slice]:
    """Contiguous slices covering ``range(n)``; ``batch_size`` 0 or ≥ n gives one full batch."""
    if batch_size <= 0 or batch_size >= n:
        return [slice(0, n)]
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

"""Datasets and the deterministic input pipeline (NumPy only, shared by every framework).

Every batch is a pure function of (config, step): the epoch's permutation is seeded by
(seed, epoch) and augmentation by (seed, step). A run resumed from a checkpoint at any step
therefore sees exactly the data of an uninterrupted run, and TF and torch see the same data.
Nothing is downloaded: digits ship with scikit-learn, the corpus is generated, and CIFAR-10 is
read from a local directory when a user has it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faultlab.errors import DataError, SpecError
from faultlab.workloads.base import WorkloadConfig

IMAGE_DATASETS = ("digits", "cifar10", "synthetic")
TEXT_DATASETS = ("corpus",)
#: the datasets each built-in workload can train on: ResNet-18 takes 3-channel images (digits
#: are repeated over 3 channels), the perceptron 1-channel ones (digits only: CIFAR-10 and the
#: synthetic images have 3), the language model token ids (the corpus)
WORKLOAD_DATASETS = {"resnet18": ("cifar10", "digits", "synthetic"), "mlp": ("digits",),
                     "transformer": ("corpus",)}


def check_dataset(config: WorkloadConfig) -> None:
    """A one-line SpecError (field "dataset", listing the valid choices) when a built-in
    workload is configured with a dataset that does not exist or that it cannot train on
    (checked where campaign files are read, before anything is built). User workloads load
    their own data: their dataset name is theirs to interpret."""
    valid = WORKLOAD_DATASETS.get(config.workload)
    if valid is None or config.dataset in valid:
        return
    name = config.dataset
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    if name in IMAGE_DATASETS + TEXT_DATASETS:
        kind = "token ids" if name in TEXT_DATASETS else (
            "3-channel images" if name != "digits" else "images")
        raise SpecError(f"workload {config.workload} cannot train on dataset {shown} "
                        f"({kind}): valid datasets are {', '.join(valid)}", "dataset")
    raise SpecError(f"unknown dataset {shown}: workload {config.workload} trains on "
                    f"{', '.join(valid)} (datasets: "
                    f"{', '.join(sorted(IMAGE_DATASETS + TEXT_DATASETS))})", "dataset")


@dataclass(frozen=True)
class Dataset:
    """Arrays of one dataset: images NHWC float32 in [0, 1] (or token ids) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int


def data_dir() -> Path:
    return Path(os.environ.get("FAULTLAB_DATA", Path.home() / ".faultlab" / "data"))


def _resize_nearest(x: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of NHWC images to size x size (exact, no interpolation maths)."""
    h, w = x.shape[1:3]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return x[:, rows][:, :, cols]


@functools.lru_cache(maxsize=8)
def _digits(size: int, channels: int) -> Dataset:
    from sklearn.datasets import load_digits  # ships its data: no download

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    x = _resize_nearest(x, size)
    x = np.repeat(x, channels, axis=3) if channels > 1 else x
    y = d.target.astype(np.int64)
    order = np.random.default_rng(20231).permutation(len(y))
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], 10)


def _read_cifar_bin(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size % 3073:
            raise DataError(f"{f}: not a CIFAR-10 binary batch ({raw.size} bytes is not a "
                            f"multiple of 3073)")
        rows.append(raw.reshape(-1, 3073))
    raw = np.concatenate(rows)
    y = raw[:, 0].astype(np.int64)
    x = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return x, y


@functools.lru_cache(maxsize=2)
def _cifar10(size: int) -> Dataset:
    """CIFAR-10 from the binary release (cifar-10-batches-bin) in $FAULTLAB_DATA.

    The Python release is a set of pickles; faultlab never unpickles data, so it is refused."""
    root = data_dir() / "cifar-10-batches-bin"
    train = [root / f"data_batch_{i}.bin" for i in range(1, 6)]
    test = [root / "test_batch.bin"]
    missing = [p for p in train + test if not p.is_file()]
    if missing:
        raise DataError(f"CIFAR-10 not found: {missing[0]} is missing; put the binary release "
                        f"(cifar-10-binary.tar.gz, extracted) in {data_dir()} or set "
                        f"FAULTLAB_DATA, or use dataset 'digits'")
    xtr, ytr = _read_cifar_bin(train)
    xte, yte = _read_cifar_bin(test)
    if size != 32:
        xtr, xte = _resize_nearest(xtr, size), _resize_nearest(xte, size)
    return Dataset(xtr, ytr, xte, yte, 10)


@functools.lru_cache(maxsize=4)
def _synthetic(size: int, seed: int) -> Dataset:
    """Random images with a learnable label (the brightest of 10 regions); for shape tests."""
    rng = np.random.default_rng([seed, 77])
    x = rng.random((1200, size, size, 3), dtype=np.float32) * 0.5
    y = rng.integers(0, 10, size=1200)
    band = max(1, size // 10)
    for c in range(10):  # vectorised per class, not per sample
        sel = y == c
        x[sel, (c * band) % size:(c * band) % size + band, :, :] += 0.5
    return Dataset(x[:1000], y[:1000].astype(np.int64), x[1000:], y[1000:].astype(np.int64), 10)


# --- a generated corpus for the language model -------------------------------------------------

VOCAB = "\n .,abcdefghijklmnopqrstuvwxyz"
_WORDS = {
    "det": ["the", "a", "every", "no", "some"],
    "adj": ["small", "red", "quiet", "fast", "old", "bright", "cold"],
    "noun": ["unit", "chip", "model", "gradient", "kernel", "replica", "step", "tensor"],
    "verb": ["flips", "stores", "checks", "moves", "loads", "trains", "sees", "drops"],
    "adv": ["slowly", "often", "never", "quickly", "again"],
}


@functools.lru_cache(maxsize=2)
def corpus_text(seed: int = 0, sentences: int = 6000) -> str:
    """A deterministic text from a tiny grammar: structured enough for an LM to learn."""
    rng = np.random.default_rng([seed, 0xC0])
    parts = []
    for _ in range(sentences):
        w = [rng.choice(_WORDS["det"])]
        if rng.random() < 0.5:
            w.append(rng.choice(_WORDS["adj"]))
        w += [rng.choice(_WORDS["noun"]), rng.choice(_WORDS["verb"])]
        w += [rng.choice(_WORDS["det"]), rng.choice(_WORDS["noun"])]
        if rng.random() < 0.3:
            w.append(rng.choice(_WORDS["adv"]))
        parts.append(" ".join(w) + ("." if rng.random() < 0.8 else ","))
    return " ".join(parts)


@functools.lru_cache(maxsize=4)
def _corpus(seq: int) -> Dataset:
    lut = np.zeros(256, dtype=np.int64)
    lut[np.frombuffer(VOCAB.encode(), dtype=np.uint8)] = np.arange(len(VOCAB))
    ids = lut[np.frombuffer(corpus_text().encode(), dtype=np.uint8)]
    n = (ids.size - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1: n * seq + 1].reshape(n, seq)
    n_test = n // 10
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], len(VOCAB))


def load(config: WorkloadConfig, channels: int = 3) -> Dataset:
    name = config.dataset
    if name == "digits":
        return _digits(config.input_size, channels)
    if name == "cifar10":
        return _cifar10(config.input_size)
    if name == "synthetic":
        return _synthetic(config.input_size, config.seed)
    if name == "corpus":
        return _corpus(config.input_size)
    raise DataError(f"unknown dataset {name!r} (expected one of: "
                    f"{', '.join(IMAGE_DATASETS + TEXT_DATASETS)})")


class Pipeline:
    """Per-step batches of a dataset, a pure function of (config, step)."""

    def __init__(self, config: WorkloadConfig, data: Dataset, augment: bool = False):
        self.config, self.data, self.augment = config, data, augment
        n = len(data.y_train)
        self._per_epoch = config.steps_per_epoch * config.global_batch
        self._n = n

    def _indices(self, step: int) -> np.ndarray:
        c = self.config
        epoch, k = divmod(step, c.steps_per_epoch)
        # An epoch of the run may need more samples than the dataset holds: concatenate
        # independent permutations (seeded by epoch and round) until it is long enough.
        need = (k + 1) * c.global_batch
        rounds = -(-need // self._n)
        perm = np.concatenate([np.random.default_rng([c.seed, epoch, r]).permutation(self._n)
                               for r in range(rounds)])
        return perm[k * c.global_batch: need]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch of `step` (replica r's shard is rows r*b .. (r+1)*b)."""
        idx = self._indices(step)
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.augment:
            x = augment(x, np.random.default_rng([self.config.seed, step, 0xA6]))
        return x, y

    def test_batches(self, batch: int):
        n = min(self.config.eval_samples, len(self.data.y_test))
        for i in range(0, n, batch):
            yield self.data.x_test[i:min(i + batch, n)], self.data.y_test[i:min(i + batch, n)]


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 6) -> np.ndarray:
    """The artifact's augmentation: random horizontal / vertical flips, zero-pad, random crop."""
    n, h, w, _ = x.shape
    hflip = rng.random(n) < 0.5
    vflip = rng.random(n) < 0.5
    x = np.where(hflip[:, None, None, None], x[:, :, ::-1], x)
    x = np.where(vflip[:, None, None, None], x[:, ::-1], x)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = rng.integers(0, 2 * pad + 1, size=n)
    ox = rng.integers(0, 2 * pad + 1, size=n)
    rows = oy[:, None] + np.arange(h)[None, :]            # (n, h)
    cols = ox[:, None] + np.arange(w)[None, :]            # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]

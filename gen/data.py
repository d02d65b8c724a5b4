"""Data sets as tensors: the embedded 8x8 digits, IDX files (MNIST, Fashion-MNIST)
and 2D toy mixtures drawn from a seed.

Every data set is a `Dataset` whose `train`/`test` tensors are float32, images
as (N, 1, H, W) in [0, 1] and points as (N, 2). Batches are drawn by
`batches`, which shuffles with a permutation derived from (seed, epoch) and
drops the ragged last batch, so every batch has the same shape and a compiled
step never recompiles.
"""

import gzip
import math
import struct
import zlib
from importlib import resources
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor

from gen import rng

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SETS = ("digits", "fashion-mnist", "mnist")
TOY_SETS = ("ring8", "grid25", "moons", "swissroll")
NAMED_SETS = IMAGE_SETS + TOY_SETS  # what --data may name; anything else is a directory of IDX files


class DataError(Exception):
    """A data set that is missing or malformed; the message says what to do."""


class Dataset(NamedTuple):
    name: str
    kind: str  # "image" or "points"
    train: Tensor
    test: Tensor
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    modes: Tensor | None = None  # (M, 2) mixture centres, for mode-coverage metrics
    mode_std: float | None = None
    default_epochs: int | None = None  # for a small set, a run length that trains to convergence

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. (1, 28, 28) or (2,)."""
        return tuple(self.train.shape[1:])


def kind_of(name: str) -> str:
    """What `--data name` holds without loading it: "points" for the toy sets, else "image"
    (the named image sets and IDX directories)."""
    return "points" if name in TOY_SETS else "image"


def load(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Resolve `--data`: a known name, or a directory of IDX files."""
    if name == "digits":
        return load_digits()
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dir(_find_idx_dir(name, data_dir), name)
    if name in TOY_SETS:
        return toy_mixture(name, seed)
    path = Path(name)
    if path.is_dir():
        return load_idx_dir(path, path.name)
    if path.exists():
        raise DataError(f"--data '{name}' is a file, not a directory: give --data the directory that holds "
                        "the IDX files")
    if len(path.parts) > 1:  # a path, not a misspelt name (e.g. a run's IDX directory that has moved)
        raise DataError(f"data directory '{name}' does not exist: give --data the directory that holds "
                        "the IDX files")
    raise DataError(f"unknown data set '{name}': use one of {', '.join(NAMED_SETS)} "
                    "or a directory holding IDX files")


# --- embedded digits ---------------------------------------------------------------


def load_digits(test_size: int = 297) -> Dataset:
    """The 1,797 UCI 8x8 digits shipped in gen/assets (pixel counts 0..16).

    The train/test split is a fixed permutation (seed 0), the same for every run,
    so test losses are comparable between runs."""
    with resources.as_file(resources.files("gen") / "assets" / "digits.safetensors") as path:
        tensors = load_file(path)
    images = tensors["images"].float().div(16).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    labels = tensors["labels"].long()
    order = torch.randperm(len(images), generator=rng.generator(0, "digits-split"))
    test, train = order[:test_size], order[test_size:]
    # 1,500 training images are 40x fewer than MNIST's: 100 epochs is about 1,200 steps.
    return Dataset("digits", "image", images[train], images[test], labels[train], labels[test],
                   default_epochs=100)


# --- IDX files (MNIST, Fashion-MNIST) ----------------------------------------------

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_dir(name: str, data_dir: str | None) -> Path:
    # A --data-dir given is the only place looked: falling back to the system copy would train
    # on other data than asked for, silently, whenever the given folder was mistyped.
    if data_dir:
        candidates = [Path(data_dir)]
    else:
        candidates = [FASHION_MNIST_SYSTEM_DIR] if name == "fashion-mnist" else []
    for directory in candidates:
        if (directory / IDX_FILES["train_images"]).exists() or \
                (directory / (IDX_FILES["train_images"] + ".gz")).exists():
            return directory
    hint = ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data-dir DIR"
            if name == "fashion-mnist" else "pass --data-dir DIR")
    where = ", ".join(map(str, candidates)) or "no directory given"
    raise DataError(f"{name} not found (looked in: {where}): {hint} holding {IDX_FILES['train_images']}[.gz]")


def load_idx_dir(directory: Path, name: str) -> Dataset:
    paths = {}
    for key, stem in IDX_FILES.items():
        paths[key] = next((p for p in (directory / stem, directory / (stem + ".gz")) if p.exists()), None)
        if paths[key] is None:
            raise DataError(f"missing {stem}[.gz] in {directory}: an IDX data directory needs all four "
                            "MNIST-layout files")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {split} images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)} do not match; expected (N, H, W) images and N labels")
    train_size, test_size = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_size != test_size:
        raise DataError(f"{directory}: the train images are {train_size[0]}x{train_size[1]} but the test images "
                        f"{test_size[0]}x{test_size[1]}: both IDX image files must hold images of one size")
    return Dataset(name, "image",
                   arrays["train_images"].float().div(255).unsqueeze(1),
                   arrays["test_images"].float().div(255).unsqueeze(1),
                   arrays["train_labels"].long(), arrays["test_labels"].long())


def read_idx(path: Path) -> Tensor:
    """Parse one IDX file (raw or gzip) of unsigned bytes.

    Header: two zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions d, then d big-endian uint32 sizes; the data follows. The file is
    read as a stream and never past the header's size plus one byte, so a small
    gzip file that inflates to gigabytes costs no more memory than its header
    promises."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as stream:
            return _parse_idx(path, stream)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError; zlib.error is not
        raise DataError(f"cannot read {path}: {error}; replace the file with a good copy") from None


def _parse_idx(path: Path, stream) -> Tensor:
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); expected MNIST-format data")
    type_code, ndim = magic[2], magic[3]
    if type_code != 0x08:
        raise DataError(f"{path}: IDX type code 0x{type_code:02x} is not supported; only unsigned bytes (0x08)")
    sizes = stream.read(4 * ndim)
    if ndim == 0 or len(sizes) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions); replace the file with a good copy")
    shape = struct.unpack(f">{ndim}I", sizes)
    expected = math.prod(shape)
    if expected == 0:
        raise DataError(f"{path}: header says shape {shape}, which holds no data; replace the file with a good copy")
    data = bytearray()
    while len(data) <= expected:  # one byte past the promised size tells a file that holds more
        chunk = stream.read(min(1 << 24, expected + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    if len(data) != expected:
        held = f"{len(data)} bytes" if len(data) < expected else "more"
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                        f"{held}; replace the file with a good copy")
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape)


# --- 2D toy mixtures ---------------------------------------------------------------


def mixture_modes(name: str) -> tuple[Tensor, float]:
    """Centres and standard deviation of the Gaussian mixtures used for mode counting."""
    if name == "ring8":  # 8 Gaussians on a circle of radius 2, std 0.02
        angles = torch.arange(8) * (2 * math.pi / 8)
        return 2 * torch.stack([angles.cos(), angles.sin()], dim=1), 0.02
    if name == "grid25":  # 5x5 grid at {-4,-2,0,2,4}², std 0.05
        axis = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
        return torch.cartesian_prod(axis, axis), 0.05
    raise DataError(f"'{name}' is not a Gaussian mixture")


def sample_toy(name: str, n: int, generator: torch.Generator) -> Tensor:
    if name in ("ring8", "grid25"):
        modes, std = mixture_modes(name)
        which = torch.randint(len(modes), (n,), generator=generator)
        return modes[which] + std * torch.randn(n, 2, generator=generator)
    if name == "moons":  # two interleaved half circles, noise 0.05 (as scikit-learn's make_moons)
        upper = torch.rand(n, generator=generator) < 0.5
        t = torch.rand(n, generator=generator) * math.pi
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        return torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=generator)
    if name == "swissroll":  # t ∈ [1.5π, 4.5π], (t cos t, t sin t) / 5, noise 0.05
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        points = torch.stack([t * t.cos(), t * t.sin()], 1) / 5
        return points + 0.05 * torch.randn(n, 2, generator=generator)
    raise DataError(f"unknown toy data set '{name}': use one of {', '.join(TOY_SETS)}")


def toy_mixture(name: str, seed: int, n_train: int = 100_000, n_test: int = 10_000) -> Dataset:
    points = sample_toy(name, n_train + n_test, rng.generator(seed, "toy", name))
    modes, std = mixture_modes(name) if name in ("ring8", "grid25") else (None, None)
    return Dataset(name, "points", points[:n_train], points[n_train:], modes=modes, mode_std=std)


# --- batching ---------------------------------------------------------------------


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size


def batches(data: Tensor, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[Tensor]:
    """Shuffled full batches of one epoch, from batch index `start` on (for resuming).

    The ragged last batch is dropped: one batch shape means one compiled graph."""
    if batch_size > len(data):
        raise DataError(f"batch size {batch_size} exceeds the {len(data)} training examples; use a smaller "
                        "--batch-size")
    order = torch.randperm(len(data), generator=rng.generator(seed, "epoch", epoch)).to(data.device)
    for index in range(start, batches_per_epoch(len(data), batch_size)):
        yield data[order[index * batch_size:(index + 1) * batch_size]]

"""IDX files (MNIST's format) written for tests: gen reads them, so tests need some to read."""

import gzip
import struct

import torch


def write_idx(path, array: torch.Tensor, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_idx_dir(directory, n_train=20, n_test=10, compress=False, size=28, width=None):
    """size x size images, or size (high) x width (wide) ones."""
    suffix = ".gz" if compress else ""
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", torch.randint(0, 256, (n, size, width or size), generator=g),
                  compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", torch.randint(0, 10, (n,), generator=g), compress)
    return directory

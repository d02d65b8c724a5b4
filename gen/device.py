"""Which device a command runs on, waiting for it, and the number format of its matmuls:
shared by `gen train`, `gen sample` and `gen bench`."""

import functools
import math
import os
from pathlib import Path
from typing import Callable

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cpu" or "cuda"; anything else is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously, so a timer must wait for it first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_step(step: Callable, device: torch.device) -> Callable:
    """The step with its matmuls and convolutions in bfloat16 (`--precision bf16`): torch.autocast
    inside the step, so a compiled step traces it into its one graph. The params, their
    gradients, the optimizer's moments and update stay float32; what a matmul or convolution
    returns is bfloat16, and elementwise work on it stays bfloat16 until it meets a float32
    tensor. bfloat16 keeps float32's exponent range, so no loss scaling is needed (unlike
    float16). Measured on the 2-core AVX-512-BF16 CPU (bench/README.md): VAE b128 2.8x the
    float32 nn.Module peer against 1.7x for the float32 compiled step, DCGAN b64 1.8x against 1.3x."""
    # wraps: the step's attributes come along, its compile options (`inductor_options`) among
    # them; without them WGAN-GP's bf16 step failed to compile on the CPU.
    @functools.wraps(step)
    def step_bf16(state, batch, inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            new_state, metrics = step(state, batch, inputs)
        # A mean of bfloat16 logits is bfloat16 (3 significant digits): log metrics as float32.
        return new_state, {name: value.float() for name, value in metrics.items()}
    return step_bf16


def physical_memory_bytes() -> float:
    """The memory this process may use: the machine's RAM, or less under a cgroup (container)
    limit; infinite where the OS says neither."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = math.inf
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max": no limit
    except OSError:
        return ram
    return min(ram, int(limit)) if limit.isdigit() else ram


def memory_bytes(device: torch.device) -> float:
    """The memory a device offers: a GPU's own, or for the CPU what this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory_bytes()

"""The machine the benchmark runs on: device, float32 matmul peak, memory, timing."""

import ctypes
import os
import platform
import resource
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch

from gen import mkl_amd
from gen.device import synchronize


# --- the float32 matmul peak and what the numbers came from ------------------------------


def matmul_sampler(device: torch.device | str, size: int | None = None) -> Callable[[], float]:
    """A function that times one float32 (size × size) product with each of torch's GEMMs
    (matmul_samplers) and returns the faster one's GFLOP/s: the machine's float32 matmul peak."""
    return fastest(matmul_samplers(device, size))


def fastest(samplers: dict[str, Callable[[], float]]) -> Callable[[], float]:
    """One sample from each library's sampler, the highest GFLOP/s of them."""
    return lambda: max(sample() for sample in samplers.values())


def matmul_samplers(device: torch.device | str, size: int | None = None) -> dict[str, Callable[[], float]]:
    """{library: a function that times one float32 (size × size) product and returns its GFLOP/s}.

    2·n³ FLOPs each; on CUDA TF32 stays at torch's default (off for matmul), so this
    is the true float32 rate. On the CPU torch.mm is not the fastest float32 GEMM that
    torch ships: the x86 wheels' torch.mm is MKL's, and on the 2-core AMD EPYC of
    bench/README.md oneDNN's (which Inductor uses for frozen-weight linears) ran
    207-217 GFLOP/s at 2048² against torch.mm's 162-172. The peak is the hardware's
    best, so both are timed where both exist (oneDNN through its private op, skipped
    if this torch lacks it), and a model may land above torch.mm's own rate."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
    products = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        products["oneDNN"] = lambda: onednn_linear(a, b, None, "none", [], "")  # a @ bᵀ
    samplers = {}
    for library, product in products.items():
        try:
            for _ in range(2):  # warm-up: thread pool, caches, clocks
                product()
        except (RuntimeError, TypeError):
            continue  # this build cannot run it: the peak is the others'
        synchronize(device)
        samplers[library] = timed_product(product, 2 * size ** 3, device)
    return samplers


def timed_product(product: Callable[[], object], flops: int, device: torch.device) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        product()
        synchronize(device)
        return flops / (time.perf_counter() - start) / 1e9
    return sample


def matmul_peak_gflops(device: torch.device | str, size: int | None = None, repeats: int = 7) -> float:
    """float32 matmul GFLOP/s: the median of `repeats` timed square products (see matmul_sampler)."""
    sample = matmul_sampler(device, size)
    return median(sample() for _ in range(repeats))


def machine() -> dict:
    """What the numbers came from: CPU model, cores, threads, MKL's kernels, GPU, torch version, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "mkl_kernels": mkl_amd.mkl_code_path()}  # on AMD, generic unless gen.mkl_amd's shim is in
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def keep_freed_memory() -> None:
    """Stop glibc from handing freed blocks back to the kernel (Linux only; a no-op elsewhere).

    A pure step returns new parameter and moment tensors every call (several
    MB for the VAE). With glibc's defaults, big blocks are mmap'ed or trimmed
    on free, so each step page-faults its new buffers in again: about 400
    faults and 1 ms of system time per VAE b128 step here. Raising the mmap
    and trim thresholds keeps the freed memory for reuse (the same effect as
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ or jemalloc/tcmalloc, which
    PyTorch's CPU tuning guide recommends). Process-wide, so every mode gets it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 * 2 ** 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 2 ** 30)


def time_mode(advance: Callable[[int], None], steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    advance(steps)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the last reset (per mode).
    CPU: the process's maximum resident set size so far (ru_maxrss), which only grows."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20

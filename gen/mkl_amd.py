"""MKL's Intel kernels on AMD CPUs: a two-function shim loaded before torch.

torch's x86 wheels do float32 matmuls (`torch.mm`, `F.linear`, and the products in
Inductor's compiled steps) in oneMKL. MKL chooses its kernels by CPU vendor as well as by
instruction set: on an AMD CPU it keeps to generic kernels, even where the CPU has every
instruction its Intel AVX-512 kernels use (Zen 4 does). MKL asks two functions,
`mkl_serv_intel_cpu_true` and `mkl_serv_intel_cpu`, whether the CPU is Intel. torch exports
them from libtorch_cpu.so and MKL calls them through the dynamic linker, so a library that
defines them (answering 1), loaded into the process's global symbol scope before
libtorch_cpu.so, is the one that answers, as an `LD_PRELOAD` shim would. MKL still picks
among its Intel kernels by the instruction sets the CPU reports (cpuid), so it runs only
instructions the CPU has.

`mkl_code_path()` reports the path MKL took: on the 2-core AMD EPYC (Zen 4) gen is
benchmarked on, "Intel(R) Architecture processors" (its generic kernels) without the shim,
"Intel(R) Advanced Vector Extensions 512 ..." with it; a 2048x2048 float32 product went from
152-193 to 205-223 GFLOP/s (bench/README.md has the figures for gen's steps).

The shim is C source below, built once with the C compiler Inductor already needs and kept
in the user's cache directory. It only ever acts before the first `import torch` (after
that, libtorch_cpu.so has bound its own answer); `gen`'s command line calls `load()` first
thing. GEN_MKL_INTEL_KERNELS=0 in the environment turns it off.
"""

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_SOURCE = """\
/* gen: tell oneMKL that the CPU is Intel, so it uses its Intel kernels for the
   instruction sets the CPU reports (see gen/mkl_amd.py). The first answer picks the
   GEMM kernels; the second keeps the rest of MKL (its own report of its code path
   included) of the same view. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
"""
SWITCH = "GEN_MKL_INTEL_KERNELS"
LOADED = "loaded"


def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), "" if unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_directory() -> Path:
    """$XDG_CACHE_HOME/gen, else ~/.cache/gen: where the built shim is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen"


def build_shim(directory: Path) -> Path:
    """The shim's shared library in `directory`, compiled if it is not there yet.

    The file is named by a hash of its source, and written beside and renamed into place, so
    a half-built library is never loaded. Raises OSError (no compiler, a failed build, an
    unwritable directory)."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    library = directory / f"mkl-intel-cpu-{digest}.so"
    if library.is_file():
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc or gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source, built = Path(scratch) / "shim.c", Path(scratch) / library.name
        source.write_text(SHIM_SOURCE)
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise OSError(f"{compiler} failed: {last_line}")
        os.replace(built, library)
    return library


def load(directory: Path | None = None, vendor: str | None = None) -> str:
    """Load the shim into the global symbol scope if it applies; say what was done.

    Returns "loaded", or why not: switched off, not an AMD x86-64 Linux CPU, torch already
    imported, or the build failed. Never raises: without the shim MKL is only slower."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"off ({SWITCH}=0)"
    vendor = cpu_vendor() if vendor is None else vendor
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64") or vendor != "AuthenticAMD":
        return f"not needed ({vendor or 'unknown'} CPU)"
    if "torch" in sys.modules:
        return "too late (torch was imported first)"
    try:
        directory = directory or cache_directory()
        library = build_shim(directory)
        try:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        except OSError:  # a damaged file in the cache: build it again, once
            library.unlink()
            ctypes.CDLL(str(build_shim(directory)), mode=ctypes.RTLD_GLOBAL)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # RuntimeError: no home directory
        return f"not built ({error})"
    return LOADED


class _MKLVersion(ctypes.Structure):
    """MKL's MKLVersion (mkl_types.h)."""
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                ("product_status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]


def mkl_code_path() -> str | None:
    """The kernels MKL runs in this process, in MKL's words ("Intel(R) Architecture processors"
    for its generic path, "Intel(R) Advanced Vector Extensions 512 ..." for its AVX-512 one);
    None where torch has no MKL. Imports torch (so call it after `load`)."""
    import torch
    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        version = _MKLVersion()
        library.mkl_serv_get_version(ctypes.byref(version))  # what mkl_get_version calls
    except (OSError, AttributeError):
        return None
    return version.processor.decode() if version.processor else None


def short_code_path(code_path: str) -> str:
    """MKL's code path in a word for a table's title: "generic", "AVX-512", "AVX2", ..."""
    if "Architecture processors" in code_path:
        return "generic"
    names = re.findall(r"\(Intel\(R\) ([^()]+)\)", code_path)  # "(Intel(R) AVX-512)"
    return names[0] if names else code_path

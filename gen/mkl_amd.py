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

Which kernels MKL's matmuls take follows the first answer; MKL's own report of its code path
(`mkl_code_path()`, from `mkl_serv_get_version`) follows the second, which is why the shim
gives both. On the 2-core AMD EPYC (Zen 4) gen is benchmarked on the report reads "Intel(R)
Architecture processors" (the generic kernels) without the shim and "Intel(R) Advanced Vector
Extensions 512 ..." with it, and a 2048x2048 float32 product went from 140-193 to 203-223
GFLOP/s (bench/README.md has the figures for gen's steps). The kernels round differently, so
a run is bitwise reproducible only with the same kernels (README.md, Checkpoints).

The shim is C source below, built once with the system's C compiler (cc or gcc, or $CC; the
toolchain Inductor's C++ compiler comes with) and kept in $XDG_CACHE_HOME/gen or ~/.cache/gen.
It only ever acts before the first `import torch` (after that, libtorch_cpu.so has bound its
own answer); `gen`'s command line calls `load()` first thing. GEN_MKL_INTEL_KERNELS=0 in the
environment turns it off.
"""

import ctypes
import hashlib
import os
import platform
import re
import shlex
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
    """$XDG_CACHE_HOME/gen, else ~/.cache/gen: where the built shim is kept (a relative
    XDG_CACHE_HOME is ignored, as the XDG spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "gen"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_shim(directory: Path) -> Path:
    """The shim's shared library in `directory`, compiled unless a complete one is there.

    The library is named by a hash of its source; the hash of the built file is recorded
    beside it (`.sha256`) after the library is in place. Both are built in a scratch folder
    and renamed in, and a library without a matching record (a build cut short, a file
    truncated by a crash or a partial copy of the cache) is built again: loading a truncated
    shared library can kill the process with SIGBUS, past any Python error handling. The
    check makes flushing to disk unnecessary. Raises OSError (no compiler, a failed build,
    an unwritable directory)."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    library = directory / f"mkl-intel-cpu-{digest}.so"
    record = library.with_name(library.name + ".sha256")
    try:
        if record.read_text().strip() == file_digest(library):
            return library
    except OSError:
        pass  # not built yet, or built incompletely: build it
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise OSError("no C compiler (cc or gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source, built = Path(scratch) / "shim.c", Path(scratch) / library.name
        source.write_text(SHIM_SOURCE)
        result = subprocess.run([*compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                                capture_output=True, text=True, errors="replace", timeout=60)
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise OSError(f"{' '.join(compiler)} failed: {last_line}")
        built_record = Path(scratch) / record.name
        built_record.write_text(file_digest(built) + "\n")
        os.replace(built, library)
        os.replace(built_record, record)
    return library


def load(directory: Path | None = None, vendor: str | None = None) -> str:
    """Load the shim into the global symbol scope if it applies; say what was done.

    Returns "loaded", or why not: switched off, not an AMD (or Hygon, also Zen) x86-64
    Linux CPU, torch already imported, or the build or load failed. Never raises: without
    the shim MKL is only slower. The shim answers any MKL in the process (an MKL-linked
    numpy's too), since it sits in the global scope."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"off ({SWITCH}=0)"
    vendor = cpu_vendor() if vendor is None else vendor
    if sys.platform != "linux" or platform.machine() != "x86_64" or vendor not in ("AuthenticAMD", "HygonGenuine"):
        return f"not needed ({vendor or 'unknown'} CPU)"
    if "torch" in sys.modules:
        return "too late (torch was imported first)"
    try:
        library = build_shim(directory or cache_directory())
    # ValueError: a $CC that shlex cannot split; RuntimeError: no home directory
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as error:
        return f"not built ({error})"
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:  # e.g. a cache on a noexec file system
        return f"not loaded ({error})"
    return LOADED


class _MKLVersion(ctypes.Structure):
    """MKL's MKLVersion (mkl_types.h)."""
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                ("product_status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]


def mkl_code_path() -> str | None:
    """MKL's report of its code path in this process ("Intel(R) Architecture processors" for
    its generic kernels, "Intel(R) Advanced Vector Extensions 512 ..." for its AVX-512 ones;
    with the shim it agrees with the matmul kernels, see above); None where torch has no MKL.
    Imports torch (so call it after `load`)."""
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

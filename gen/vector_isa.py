"""The CPU's SIMD instruction sets for Inductor, probed once per compile-cache directory.

Before its first CPU kernel Inductor checks which SIMD instruction sets (AVX2, AVX-512, ...)
the compiler and CPU support, by building and loading a test library in a child process for
each: about 1.1 s in every process, warm cache or not. `trusted_vector_isa` runs that probe
once, records its verdict next to the compile cache, and later processes take the CPU's flags
for it (Inductor's own `cpp.vec_isa_ok` switch) when they agree with the record. gen passes the
switch with every CPU compile, probed or not, because it is part of the cache key
(gen.compilation.CPU_OPTIONS).

The switch does not cover AVX-512's bf16 and VNNI checks, which loaded their test libraries in
three child processes regardless (0.2 s of every warm start); with a record those loads are
skipped too (`vector_isas`). WGAN-GP b256 warm compile, four probes each, alternating:
4.37-4.93 -> 4.25-4.62 s.

A CPU flag the compiler cannot build for is dropped by the probe; a record is written only
when the probe agrees with the flags, so such a flag is never trusted. The record names the
torch version, the CPU's flags and the compiler (its file), and is trusted only by a process
that matches all three.
"""

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

from gen import checkpoint

VECTOR_ISA_RECORD = "gen-vector-isa.json"


def trusted_vector_isa(cache_dir: str | Path | None = None) -> list[str]:
    """The SIMD instruction sets Inductor will generate CPU code for, settled for this process.

    First time in a cache directory (or after torch or the CPU changed): Inductor's
    own probe runs, and if it confirms every set the CPU's flags claim, the list is
    recorded in `cache_dir`/gen-vector-isa.json. With a matching record the probe is
    skipped. Either way Inductor's in-process list of sets is left filled in, with
    the probe's verdict where it ran, so the compile that follows uses it."""
    from torch._inductor import cpu_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    record_path = Path(cache_dir or inductor_cache_dir()) / VECTOR_ISA_RECORD
    identity = {"torch": torch.__version__, "cpu_flags": sorted(cpu_vec_isa.x86_isa_checker()),
                "compiler": compiler_identity()}
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = None
    # What the flags claim, each set's test library taken as loadable (the record says it was).
    claimed = vector_isas(probe=False, trust_loads=True)
    if isinstance(record, dict) and {key: record.get(key) for key in identity} == identity \
            and record.get("isas") == claimed:
        return claimed
    probed = vector_isas(probe=True)
    if probed == claimed:
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(record_path, json.dumps({**identity, "isas": probed}) + "\n")
        except OSError:
            pass  # a read-only cache: the probe simply runs again next time
    return probed


def compiler_identity() -> list | None:
    """The C++ compiler Inductor builds with, as [resolved path, size, modification time]: another
    or an upgraded compiler (a cache directory shared between machines) may not build what this
    one did, so its record is not trusted. Read from the file system; no process is run. None
    where no compiler is found (the probe then decides, as always)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        compiler = get_cpp_compiler()
        path = os.path.realpath(shutil.which(compiler) or compiler)
        status = os.stat(path)
    except (OSError, RuntimeError, ValueError):
        return None
    return [path, status.st_size, int(status.st_mtime)]


def vector_isas(probe: bool, trust_loads: bool = False) -> list[str]:
    """Inductor's list of usable SIMD sets, each with the extensions it found ("avx512+avx512_bf16"):
    from the CPU's flags alone, or, with `probe`, also built and loaded as test libraries. Its
    cached list is replaced by this answer.

    `cpp.vec_isa_ok` (the flags alone) skips the load of each set's test library, but not those
    of AVX-512's bf16 and VNNI checks: three child processes, 0.2 s of every warm start here.
    With `trust_loads` (for a cache directory whose record says they loaded before) those loads
    are taken as done; the libraries are still built (from the compile cache), so a compiler that
    cannot build an extension still drops it. Inductor caches each AVX-512 set's whole verdict
    (the set and its extensions), keyed on nothing: every answer here starts without them, or a
    probe after a flags-only answer would take that answer for AVX-512 without building its test
    library (a compiler unable to build ATen's AVX-512 code then went unnoticed)."""
    from torch._inductor import config, cpu_vec_isa
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    forget_extension_verdicts()
    loads = mock.patch.object(cpu_vec_isa.VecISA, "_probe_load", lambda self, path: True) if trust_loads \
        else nullcontext()
    with config.patch({"cpp.vec_isa_ok": None if probe else True}), loads:
        return [isa_name(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]


def forget_extension_verdicts() -> None:
    """Forget every verdict Inductor keeps on its sets, as a new process starts without them:
    the functools caches on each set's class (its __bool__, the base class's per-switch verdict,
    the extension queries) and the extension flags a passed check set on the instance (a check
    that fails later never sets them back)."""
    from torch._inductor import cpu_vec_isa
    for isa in cpu_vec_isa.supported_vec_isa_list:
        for name in [name for name in vars(isa) if name.startswith("_is_") and name.endswith("_supported")]:
            delattr(isa, name)  # back to the class's False
        for cls in type(isa).__mro__:
            for value in vars(cls).values():
                getattr(value, "cache_clear", lambda: None)()


def isa_name(isa) -> str:
    """"avx512", with "+avx512_bf16" and the like for each extension Inductor found usable."""
    extensions = sorted(name[len("_is_"):-len("_supported")] for name, value in vars(isa).items()
                        if name.startswith("_is_") and name.endswith("_supported") and value)
    return "+".join([str(isa), *extensions])

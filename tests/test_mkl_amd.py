"""gen.mkl_amd: the shim that lets MKL use its Intel kernels on AMD CPUs.

The shim only acts before torch is imported, so what it changes is checked in fresh
processes; this process (torch long imported) checks when it declines to act."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen import mkl_amd

ROOT = Path(__file__).resolve().parent.parent
GENERIC = "Intel(R) Architecture processors"  # MKL's name for its vendor-neutral kernels

needs_mkl_on_linux_x86 = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and torch.backends.mkl.is_available()
         and (shutil.which("cc") or shutil.which("gcc"))),
    reason="the shim is for torch's MKL on x86-64 Linux, built with a C compiler")


def clean_environment(cache: Path, **changes: str) -> dict:
    """This process's environment without the variables that steer the shim, its cache in `cache`."""
    env = {k: v for k, v in os.environ.items() if k not in (mkl_amd.SWITCH, "CC")}
    return {**env, "XDG_CACHE_HOME": str(cache), **changes}


def in_fresh_process(code: str, cache: Path) -> dict:
    """Run `code` (which prints one JSON line last) in a new interpreter; its parsed output."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=clean_environment(cache), timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PRODUCTS = """
import hashlib, json, pathlib
from gen import mkl_amd
state = mkl_amd.load(pathlib.Path({directory!r}), vendor="AuthenticAMD") if {load} else "not asked"
import torch
g = torch.Generator().manual_seed(0)
errors = []
for m, k, n, transposed in [(128, 784, 400, False), (784, 128, 400, True), (3, 5, 7, False), (1, 300, 33, True),
                            (257, 129, 65, False)]:
    a = torch.randn(k, m, generator=g).t() if transposed else torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    exact = a.double() @ b.double()
    errors.append(((a @ b).double() - exact).abs().max().item() / exact.abs().max().item())
a, b = torch.randn(128, 784, generator=g), torch.randn(784, 400, generator=g)
digest = hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()  # which kernels ran: they round differently
print(json.dumps({{"state": state, "code_path": mkl_amd.mkl_code_path(), "errors": errors, "product": digest}}))
"""


@needs_mkl_on_linux_x86
def test_mkl_takes_the_shims_answer_and_its_products_stay_exact(tmp_path):
    """Loaded before torch, the shim moves MKL off its generic kernels (what it does on an AMD
    CPU without it; an Intel CPU is off them already), and MKL's float32 products still agree
    with float64 ones, transposed operands and odd shapes included. On an AMD CPU the matmul
    kernels themselves change, which MKL's report alone would not show: the same product
    rounds differently."""
    shimmed = in_fresh_process(PRODUCTS.format(load=True, directory=str(tmp_path)), tmp_path)
    assert shimmed["state"] == mkl_amd.LOADED
    assert shimmed["code_path"] and shimmed["code_path"] != GENERIC
    if " avx2" in Path("/proc/cpuinfo").read_text():
        assert "AVX" in shimmed["code_path"]
    assert max(shimmed["errors"]) < 1e-5
    assert len(list(tmp_path.glob("mkl-intel-cpu-*.so"))) == 1  # built into the directory it was given
    if mkl_amd.cpu_vendor() == "AuthenticAMD":  # why the shim exists: MKL's choice without it
        plain = in_fresh_process(PRODUCTS.format(load=False, directory=""), tmp_path)
        assert plain["code_path"] == GENERIC
        assert plain["product"] != shimmed["product"]


@needs_mkl_on_linux_x86
def test_a_damaged_shim_in_the_cache_is_built_again(tmp_path):
    damaged = tmp_path / mkl_amd.build_shim(tmp_path).name
    damaged.write_bytes(b"not a shared library")
    shimmed = in_fresh_process(PRODUCTS.format(load=True, directory=str(tmp_path)), tmp_path)
    assert shimmed["state"] == mkl_amd.LOADED and shimmed["code_path"] != GENERIC
    assert damaged.read_bytes().startswith(b"\x7fELF")


@needs_mkl_on_linux_x86
def test_gen_bench_loads_the_shim_and_records_mkls_kernels(tmp_path):
    out = tmp_path / "bench.json"
    env = clean_environment(tmp_path / "cache")
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "gan-2d", "--mode", "eager", "--steps", "1",
                             "--repeats", "1", "--no-compile-times", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    machine = json.loads(out.read_text())["machine"]
    if mkl_amd.cpu_vendor() == "AuthenticAMD":
        assert machine["mkl_kernels"] != GENERIC
        assert list((tmp_path / "cache" / "gen").glob("mkl-intel-cpu-*.so"))
    else:
        assert machine["mkl_kernels"]


def test_the_shim_declines_where_it_cannot_or_need_not_act(tmp_path, monkeypatch):
    assert "torch" in sys.modules  # this process: too late for any CPU's MKL
    if sys.platform == "linux" and platform.machine() == "x86_64":
        # Hygon's Dhyana is a Zen core: MKL treats it as AMD too, so the shim is meant for it.
        for vendor in ("AuthenticAMD", "HygonGenuine"):
            assert mkl_amd.load(tmp_path, vendor=vendor) == "too late (torch was imported first)"
    assert mkl_amd.load(tmp_path, vendor="GenuineIntel").startswith("not needed")
    monkeypatch.setenv("GEN_MKL_INTEL_KERNELS", "0")
    assert mkl_amd.load(tmp_path, vendor="AuthenticAMD") == "off (GEN_MKL_INTEL_KERNELS=0)"
    assert not list(tmp_path.iterdir())  # nothing built when it does not act


def test_a_failed_build_leaves_nothing_behind_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(OSError, match="false failed"):
        mkl_amd.build_shim(tmp_path)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        mkl_amd.build_shim(tmp_path)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_the_shim_is_built_once_per_source(tmp_path, monkeypatch):
    library = mkl_amd.build_shim(tmp_path)
    built_at = library.stat().st_mtime_ns
    monkeypatch.setenv("CC", "false")  # a second build would fail: the library on disk is reused
    assert mkl_amd.build_shim(tmp_path) == library and library.stat().st_mtime_ns == built_at
    assert sorted(tmp_path.iterdir()) == [library, library.with_name(library.name + ".sha256")]  # no leftovers


def test_short_code_path_names_the_instruction_set():
    assert mkl_amd.short_code_path(GENERIC) == "generic"
    assert mkl_amd.short_code_path("Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support of "
                                   "Intel(R) Deep Learning Boost (Intel(R) DL Boost) and bfloat16") == "AVX-512"
    assert mkl_amd.short_code_path("Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors") \
        == "AVX2"


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_a_truncated_library_in_the_cache_is_built_again_before_it_is_loaded(tmp_path):
    """A shared library cut short (a crash before the disk had it all, a partial copy of the
    cache) can kill the process that loads it with SIGBUS; the recorded hash keeps it unloaded."""
    library = mkl_amd.build_shim(tmp_path)
    complete = library.read_bytes()
    library.write_bytes(complete[:4096])
    assert mkl_amd.build_shim(tmp_path) == library
    assert len(library.read_bytes()) == len(complete)
    assert mkl_amd.file_digest(library) == (tmp_path / (library.name + ".sha256")).read_text().strip()
    (tmp_path / (library.name + ".sha256")).unlink()  # a build cut short before its record: built again
    assert mkl_amd.build_shim(tmp_path) == library and (tmp_path / (library.name + ".sha256")).exists()


@pytest.mark.parametrize("compiler", ["false", '"unbalanced quote'])
def test_gen_runs_when_the_shim_cannot_be_built(tmp_path, compiler):
    env = clean_environment(tmp_path / "cache", CC=compiler)
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").glob("gen/mkl-intel-cpu-*.so"))  # the failed build left nothing


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_cc_may_carry_arguments(tmp_path, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{compiler} -m64")
    assert mkl_amd.build_shim(tmp_path).is_file()


def test_the_bench_table_names_mkls_kernels(capsys):
    from gen import bench
    bench.print_table([], {"cpu": "AMD EPYC", "cores": 2, "torch": torch.__version__,
                           "mkl_kernels": "Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support of "
                                          "Intel(R) Deep Learning Boost (Intel(R) DL Boost) and bfloat16"})
    assert "MKL AVX-512 kernels" in capsys.readouterr().out

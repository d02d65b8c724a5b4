"""gen/vector_isa.py: Inductor's vector-ISA probe runs once per cache directory, and a probe that
disagrees with the CPU's flags is never recorded."""

import json
import os

import pytest
import torch

from gen import vector_isa


def spy_on_probes(monkeypatch) -> list[bool]:
    """Record every vector_isas call's `probe` argument, still running the real thing."""
    calls, real = [], vector_isa.vector_isas

    def spy(probe, trust_loads=False):
        calls.append(probe)
        return real(probe, trust_loads)
    monkeypatch.setattr(vector_isa, "vector_isas", spy)
    return calls


def test_vector_isa_probe_runs_once_per_cache_directory(tmp_path, monkeypatch):
    calls = spy_on_probes(monkeypatch)
    first = vector_isa.trusted_vector_isa(tmp_path)
    assert True in calls  # nothing recorded yet: Inductor's probe ran
    record = json.loads((tmp_path / vector_isa.VECTOR_ISA_RECORD).read_text())
    assert record["isas"] == first == vector_isa.vector_isas(probe=False)
    assert record["torch"] == torch.__version__

    calls.clear()
    assert vector_isa.trusted_vector_isa(tmp_path) == first
    assert calls == [False]  # the record matched: the CPU's flags were taken, no probe

    (tmp_path / vector_isa.VECTOR_ISA_RECORD).write_text(json.dumps({**record, "torch": "0.0"}))
    calls.clear()
    vector_isa.trusted_vector_isa(tmp_path)
    assert calls == [False, True]  # another torch wrote the record: probe again
    assert json.loads((tmp_path / vector_isa.VECTOR_ISA_RECORD).read_text())["torch"] == torch.__version__

    (tmp_path / vector_isa.VECTOR_ISA_RECORD).write_text(json.dumps({**record, "compiler": ["/other/g++", 1, 2]}))
    calls.clear()
    vector_isa.trusted_vector_isa(tmp_path)
    assert calls == [False, True]  # another compiler (a cache shared between machines): probe again
    compiler = vector_isa.compiler_identity()
    assert compiler is not None and json.loads((tmp_path / vector_isa.VECTOR_ISA_RECORD).read_text())["compiler"] == compiler


def test_a_recorded_verdict_loads_no_test_library(tmp_path, monkeypatch):
    """With a matching record nothing is loaded in a child process, AVX-512's bf16 and VNNI
    checks included (they loaded theirs even under cpp.vec_isa_ok: 0.2 s of every warm start)."""
    from torch._inductor import cpu_vec_isa

    first = vector_isa.trusted_vector_isa(tmp_path)  # probed and recorded
    loads, real_load = [], cpu_vec_isa.VecISA._probe_load

    def counted_load(isa, path):
        loads.append(path)
        return real_load(isa, path)
    monkeypatch.setattr(cpu_vec_isa.VecISA, "_probe_load", counted_load)
    vector_isa.forget_extension_verdicts()  # as in a new process: no verdict cached yet
    assert vector_isa.trusted_vector_isa(tmp_path) == first
    assert loads == []
    assert vector_isa.vector_isas(probe=False) == first  # without the record's trust ...
    if any("+" in name for name in first):  # ... a CPU with such extensions loads their libraries
        assert loads


def test_a_disagreeing_probe_is_not_recorded_and_wins(tmp_path, monkeypatch):
    """A CPU flag the compiler cannot build for (the probe drops it) must never be trusted."""
    def vector_isas(probe, trust_loads=False):
        return ["avx2"] if probe else ["avx512", "avx2"]
    monkeypatch.setattr(vector_isa, "vector_isas", vector_isas)
    assert vector_isa.trusted_vector_isa(tmp_path) == ["avx2"]
    assert not (tmp_path / vector_isa.VECTOR_ISA_RECORD).exists()


def test_the_probe_builds_every_set_the_flags_claim(tmp_path, monkeypatch):
    """The probe must build and load each set's own test library, AVX-512's included: Inductor
    caches each AVX-512 set's verdict, and one made from the CPU's flags alone (cpp.vec_isa_ok)
    must not stand in for the probe. A compiler that cannot build ATen's AVX-512 code (the
    test library of the set itself, not of an extension) must see the set dropped, unrecorded."""
    from torch._inductor import cpu_vec_isa

    claimed = vector_isa.vector_isas(probe=False)
    if not any(name.startswith("avx512") for name in claimed):
        pytest.skip("no AVX-512 on this CPU: Inductor's probe of AVX2 alone is not cached")
    real_build = cpu_vec_isa.VecISA.check_build

    def no_avx512(isa, code):  # the set's own test library includes ATen's vec.h; the extensions' do not
        return False if str(isa).startswith("avx512") and "ATen/cpu/vec" in code else real_build(isa, code)
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", no_avx512)
    try:
        trusted = vector_isa.trusted_vector_isa(tmp_path)
    finally:  # leave Inductor no verdict made under the fake compiler
        monkeypatch.undo()
        vector_isa.vector_isas(probe=False)
    assert not any(name.startswith("avx512") for name in trusted)
    assert not (tmp_path / vector_isa.VECTOR_ISA_RECORD).exists()


def test_a_fresh_a_corrupt_or_a_mismatched_record_means_a_probe(tmp_path, monkeypatch):
    """Inductor's cache directory need not exist yet (the probe runs before the first compile); a
    record that is not JSON, not an object, or lists other sets than the flags claim is not trusted:
    the probe runs and the record is rewritten."""
    calls = []

    def vector_isas(probe, trust_loads=False):
        calls.append(probe)
        return ["avx2"]
    monkeypatch.setattr(vector_isa, "vector_isas", vector_isas)
    cache = tmp_path / "not" / "made" / "yet"
    assert vector_isa.trusted_vector_isa(cache) == ["avx2"]
    record_path = cache / vector_isa.VECTOR_ISA_RECORD
    record = json.loads(record_path.read_text())
    assert record["isas"] == ["avx2"]
    calls.clear()
    assert vector_isa.trusted_vector_isa(cache) == ["avx2"]
    assert calls == [False]  # trusted
    for text in ('{"torch": ', "[]", json.dumps({**record, "isas": ["avx512", "avx2"]})):
        record_path.write_text(text)
        calls.clear()
        assert vector_isa.trusted_vector_isa(cache) == ["avx2"], text
        assert calls == [False, True], text
        assert json.loads(record_path.read_text()) == record, text


def test_a_read_only_cache_directory_still_gets_an_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(vector_isa, "vector_isas", lambda probe, trust_loads=False: ["avx2"])

    def read_only(path, text):
        raise PermissionError(13, "Read-only file system", str(path))
    monkeypatch.setattr(vector_isa.checkpoint, "write_text", read_only)
    assert vector_isa.trusted_vector_isa(tmp_path) == ["avx2"]
    assert not (tmp_path / vector_isa.VECTOR_ISA_RECORD).exists()


def test_compiler_identity_changes_with_the_compiler_file_and_is_none_without_one(tmp_path, monkeypatch):
    """An upgrade in place (same path; another size or modification time) is another compiler."""
    from torch._inductor import cpp_builder
    compiler = tmp_path / "g++"
    compiler.write_text("v1")
    os.utime(compiler, (1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: str(compiler))
    first = vector_isa.compiler_identity()
    assert first is not None and first[0] == os.path.realpath(compiler)
    os.utime(compiler, (1_000_000_100, 1_000_000_100))  # same size, touched
    touched = vector_isa.compiler_identity()
    assert touched != first
    compiler.write_text("v2, longer")
    os.utime(compiler, (1_000_000_100, 1_000_000_100))  # same time, another size
    assert vector_isa.compiler_identity() not in (first, touched)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: str(tmp_path / "no-such-g++"))
    assert vector_isa.compiler_identity() is None


def test_a_probe_drops_an_extension_an_earlier_verdict_found(monkeypatch):
    """Inductor sets an extension's flag on the set's instance when its check passes and never
    clears it: a probe whose bf16 check fails must not inherit the earlier verdict's '+avx512_bf16'."""
    from torch._inductor import cpu_vec_isa
    if not any("+avx512_bf16" in name for name in vector_isa.vector_isas(probe=False)):
        pytest.skip("no AVX-512 bf16 on this CPU")
    real_build = cpu_vec_isa.VecISA.check_build

    def no_bf16(isa, code):  # the bf16 check's test library is the one using this intrinsic
        return False if "_mm512_cvtne2ps_pbh" in code else real_build(isa, code)
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", no_bf16)
    try:
        probed = vector_isa.vector_isas(probe=True)
    finally:  # leave Inductor no verdict made under the fake compiler
        monkeypatch.undo()
        vector_isa.vector_isas(probe=False)
    assert any(name.startswith("avx512") for name in probed)
    assert not any("avx512_bf16" in name for name in probed), probed

"""gen/compilation.py: the vector-ISA probe runs once per cache directory; steady() skips guards."""

import json

import pytest
import torch

from gen import compilation


def spy_on_probes(monkeypatch) -> list[bool]:
    """Record every vector_isas call's `probe` argument, still running the real thing."""
    calls, real = [], compilation.vector_isas

    def spy(probe):
        calls.append(probe)
        return real(probe)
    monkeypatch.setattr(compilation, "vector_isas", spy)
    return calls


def test_vector_isa_probe_runs_once_per_cache_directory(tmp_path, monkeypatch):
    calls = spy_on_probes(monkeypatch)
    first = compilation.trusted_vector_isa(tmp_path)
    assert True in calls  # nothing recorded yet: Inductor's probe ran
    record = json.loads((tmp_path / compilation.VECTOR_ISA_RECORD).read_text())
    assert record["isas"] == first == compilation.vector_isas(probe=False)
    assert record["torch"] == torch.__version__

    calls.clear()
    assert compilation.trusted_vector_isa(tmp_path) == first
    assert calls == [False]  # the record matched: the CPU's flags were taken, no probe

    (tmp_path / compilation.VECTOR_ISA_RECORD).write_text(json.dumps({**record, "torch": "0.0"}))
    calls.clear()
    compilation.trusted_vector_isa(tmp_path)
    assert calls == [False, True]  # another torch wrote the record: probe again
    assert json.loads((tmp_path / compilation.VECTOR_ISA_RECORD).read_text())["torch"] == torch.__version__


def test_a_disagreeing_probe_is_not_recorded_and_wins(tmp_path, monkeypatch):
    """A CPU flag the compiler cannot build for (the probe drops it) must never be trusted."""
    def vector_isas(probe):
        return ["avx2"] if probe else ["avx512", "avx2"]
    monkeypatch.setattr(compilation, "vector_isas", vector_isas)
    assert compilation.trusted_vector_isa(tmp_path) == ["avx2"]
    assert not (tmp_path / compilation.VECTOR_ISA_RECORD).exists()


def test_steady_runs_the_one_graph_and_refuses_to_recompile():
    """Under steady() the compiled graph is reused without the full guard check; an input that
    would need another graph is refused loudly (torch raises) rather than run on the wrong graph."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend=capture, fullgraph=True, dynamic=False)
    double(torch.ones(3))
    with compilation.steady():
        assert torch.equal(double(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
        with pytest.raises(RuntimeError, match="Recompilation triggered"):
            double(torch.ones(4))
    assert len(graphs) == 1
    double(torch.ones(4))  # outside steady(): another shape compiles another graph
    assert len(graphs) == 2

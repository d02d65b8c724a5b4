"""gen/compilation.py: steady() skips guards and a warm compile_step step calls its graph directly;
convolution states go channels-last on the CPU."""

import gc
import os
import weakref

import pytest
import torch

from gen import compilation, models
from gen.config import Config, resolve
from gen.tree import flatten, leaves


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


def count_dynamo_calls(stepped) -> list:
    """Every call of a DirectStep that goes through Dynamo rather than straight to its graph."""
    calls, through_dynamo = [], stepped.compiled

    def counted(*args):
        calls.append(len(args))  # not the arguments themselves: a test checks what stays alive
        return through_dynamo(*args)
    stepped.compiled = counted
    return calls


def test_a_warm_donated_step_under_steady_calls_its_graph_directly_with_the_same_numbers(regression_step):
    """Compilation is what this test is about (one small graph). Under steady() the donated step's
    calls skip Dynamo and give, bit for bit, what the same graph gives through Dynamo; a batch of
    another shape is not run on the recorded graph but refused, as steady() promises."""
    step, fresh, batches = regression_step
    torch._dynamo.reset()
    stepped = compilation.compile_step(step, "cpu", donate=True)
    dynamo_calls = count_dynamo_calls(stepped)
    direct, through_dynamo = fresh(), fresh()
    stepped(direct, *batches[0])                   # compiles the graph and records the call
    stepped(through_dynamo, *batches[0])
    with compilation.steady():
        for index in range(1, 6):
            direct_metrics = stepped(direct, *batches[index % 3])
    for index in range(1, 6):                      # outside steady(): through Dynamo, guards and all
        dynamo_metrics = stepped(through_dynamo, *batches[index % 3])
    assert len(dynamo_calls) == 2 + 5
    assert torch.equal(direct_metrics["loss"], dynamo_metrics["loss"])
    for got, want in zip(leaves(direct), leaves(through_dynamo)):
        assert torch.equal(got, want)
    assert direct["opt_state"]["count"].item() == 6

    wider = (torch.randn(64, 8), torch.randn(64, 1))
    with compilation.steady(), pytest.raises(RuntimeError, match="Recompilation triggered"):
        stepped(direct, *wider)
    assert len(dynamo_calls) == 8 and direct["opt_state"]["count"].item() == 6


def test_a_warm_pure_step_under_steady_runs_on_each_new_state_and_matches_eager(regression_step):
    """The pure step returns a new state every call: the direct call must feed the graph the
    tensors it is given (matched by dtype, shape and strides), not the ones it recorded."""
    step, fresh, batches = regression_step
    torch._dynamo.reset()
    stepped = compilation.compile_step(step, "cpu")
    dynamo_calls = count_dynamo_calls(stepped)
    initial = fresh()
    state, expected = stepped(initial, *batches[0])[0], step(fresh(), *batches[0])[0]
    initial_weight = weakref.ref(initial["params"]["w1"])
    del initial
    gc.collect()
    assert initial_weight() is None  # the record of the compiling call keeps none of its tensors alive
    with compilation.steady():
        for index in range(1, 6):
            state, metrics = stepped(state, *batches[index % 3])
            expected, expected_metrics = step(expected, *batches[index % 3])
    assert len(dynamo_calls) == 1
    assert metrics.keys() == expected_metrics.keys() and state.keys() == expected.keys()
    assert torch.allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    for got, want in zip(leaves(state), leaves(expected)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert state["opt_state"]["count"].item() == 6


def test_convolution_layout_is_channels_last_on_the_cpu_for_convolution_states_only():
    def initial_state(model):
        family = models.get(model)
        return family.init(resolve(Config(model=model), family.defaults), (1, 28, 28), 0)

    conv_state = initial_state("conv-vae")
    layout = compilation.convolution_layout(conv_state, "cpu")
    laid_out = layout(conv_state)
    for name, value in flatten(laid_out).items():
        original = flatten(conv_state)[name]
        assert torch.equal(value, original) and value.shape == original.shape
        assert value.is_contiguous(memory_format=torch.channels_last if value.ndim == 4 else torch.contiguous_format)
    assert any(value.ndim == 4 and not value.is_contiguous() for value in flatten(laid_out).values())
    batch = torch.rand(8, 3, 28, 28)
    assert layout(batch).is_contiguous(memory_format=torch.channels_last) and torch.equal(layout(batch), batch)

    mlp_state = initial_state("vae")
    assert compilation.convolution_layout(mlp_state, "cpu")(batch) is batch   # no convolutions: as it was
    assert compilation.convolution_layout(conv_state, "cuda")(batch) is batch  # CUDA keeps its own layout



def refused_or_eager(stepped, step, *args) -> bool:
    """Whether a call under steady() that the recorded graph may not fit either ran as eager
    runs it or was refused as Dynamo refuses it ("Recompilation triggered"); not run on the
    wrong graph."""
    try:
        got = stepped(*args)
    except RuntimeError as error:
        return "Recompilation triggered" in str(error)
    got, want = flatten(dict(zip("sm", got))), flatten(dict(zip("sm", step(*args))))  # state, metrics
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and got[k].requires_grad == want[k].requires_grad
        and torch.allclose(got[k].detach(), want[k].detach()) for k in want)


def test_a_direct_call_runs_the_recorded_graph_only_on_calls_it_fits():
    """Compilation is what this test is about (one small pure step, compiled once). The
    record's graph took the one tensor passed as both x and y as one input, reads the state
    by position and was traced without autocast: calls that differ in any of these, or whose
    recorded tensors changed in place, must not be run on it, and neither may a call with
    another Python `k` (Dynamo, its guards skipped, would run the graph with k = 2 baked in)."""
    def step(state, x, inputs):
        out = state["a"] * x + 2 * (state["b"] @ inputs["y"])
        return ({"a": state["a"] * 1, "b": state["b"] * 1},
                {"out": out * inputs["k"]})

    torch._dynamo.reset()
    stepped = compilation.compile_step(step, "cpu")
    g = torch.Generator().manual_seed(0)
    a, b, x, y = (torch.randn(3, 3, generator=g) for _ in range(4))
    stepped({"a": a, "b": b}, x, {"y": x, "k": 2})   # compiles; x is passed twice
    wrong = []
    with compilation.steady():
        assert refused_or_eager(stepped, step, {"a": a, "b": b}, x, {"y": x, "k": 2})
        for case, args in [("x and y apart", ({"a": a, "b": b}, x, {"y": y, "k": 2})),
                           ("another key order", ({"b": b, "a": a}, x, {"y": x, "k": 2})),
                           ("another Python k", ({"a": a, "b": b}, x, {"y": x, "k": 3}))]:
            if not refused_or_eager(stepped, step, *args):
                wrong.append(case)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if not refused_or_eager(stepped, step, {"a": a, "b": b}, x, {"y": x, "k": 2}):
                wrong.append("under autocast")
        a.requires_grad_(True)  # the recorded tensor itself, changed in place
        if not refused_or_eager(stepped, step, {"a": a, "b": b}, x, {"y": x, "k": 2}):
            wrong.append("requires_grad_ in place")
        a.requires_grad_(False)
        a.data = a.data.double()
        if not refused_or_eager(stepped, step, {"a": a, "b": b}, x, {"y": x, "k": 2}):
            wrong.append(".data made float64")
    assert wrong == []


def test_a_step_that_changes_its_arguments_tree_is_not_replayed_directly():
    """Compilation is what this test is about (one tiny graph). A dict entry the step sets on its
    argument is a side effect Dynamo replays in Python after the graph: a direct call of the
    graph alone would skip it, so such a step keeps going through Dynamo; and, though not
    recorded, a call with another Python `k` is not run on the graph traced with k = 2."""
    def step(state, x, k):
        state["n"] = state["n"] + 1  # impure on purpose: the argument's dict is changed
        return {"w": state["w"] * 2}, {"s": (state["w"] * x).sum() * k}

    torch._dynamo.reset()
    stepped = compilation.compile_step(step, "cpu")
    state, x = {"w": torch.ones(3), "n": torch.zeros(())}, torch.ones(3)
    stepped(state, x, 2)
    with compilation.steady():
        assert stepped(state, x, 2)[1]["s"].item() == 6.0
        assert stepped(state, x, 3)[1]["s"].item() == 9.0
    assert state["n"].item() == 3


def test_rebuild_keeps_namedtuples():
    """A result with a namedtuple in it (recorded as its structure) is rebuilt field by field."""
    from collections import namedtuple
    Pair = namedtuple("Pair", "first second")
    template = {"metrics": Pair(None, [None])}
    assert compilation._rebuild(template, iter([1, 2])) == {"metrics": Pair(1, [2])}


def test_no_working_cpp_compiler_is_one_line_before_anything_is_traced(monkeypatch):
    from torch._inductor import config
    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/gen-test-g++",))
    monkeypatch.setenv("CXX", "/nonexistent/gen-test-g++")
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler, and /nonexistent/gen-test-g\+\+ does not run") as error:
        compilation.compile_step(lambda x: x + 1, "cpu")
    assert "\n" not in str(error.value) and "--no-compile" in str(error.value)


def test_a_compiler_that_cannot_build_the_step_is_one_line(tmp_path):
    """A compiler that runs but cannot build (Python's headers missing): the compiler's own first
    error line, not Inductor's pages of command line and traceback. In a process of its own:
    a failed build leaves Inductor's per-process caches (the vector ISA, its precompiled header)
    unfit for the compiles of later tests."""
    import subprocess
    import sys
    fake = tmp_path / "g++"  # answers --version as g++ does, fails every build
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "--version" ] && exec g++ "$@"; done\n'
                    'echo "x.cpp:1:10: fatal error: Python.h: No such file or directory" >&2\nexit 1\n')
    fake.chmod(0o755)
    script = (f"import torch\nfrom torch._inductor import config\nconfig.cpp.cxx = ({str(fake)!r},)\n"
              "from gen import compilation\n"
              "try:\n    compilation.compile_step(lambda x: (x * 3.25).sin(), 'cpu')(torch.ones(5))\n"
              "except ValueError as error:\n    print(error)\n")
    # A cache of its own: nothing cached to fall back on, and nothing left for other processes.
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    assert ("could not build the compiled step (x.cpp:1:10: fatal error: Python.h: No such file or directory)"
            in lines[0] and "--no-compile" in lines[0])


def test_build_failure_names_only_toolchain_errors():
    from torch._inductor import exc
    compiler_error = exc.CppCompileError(["g++", "k.cpp"], "k.cpp: In function 'f':\nk.cpp:3: error: 'x' undeclared\n")
    assert "(k.cpp:3: error: 'x' undeclared)" in compilation.build_failure(exc.InductorError(compiler_error, None))
    assert compilation.build_failure(RuntimeError("shape mismatch")) is None


def test_cpu_steps_compile_with_the_documented_options_and_a_step_may_override_one(monkeypatch):
    # Building a DirectStep compiles nothing: only its options and the vector-ISA settling are looked at.
    settled = []
    monkeypatch.setattr(compilation.vector_isa, "trusted_vector_isa", lambda: settled.append(1))

    def step(state, batch, inputs):
        return state, {}

    # The C++ wrapper, built apart from the kernels, with Inductor's ISA probe trusted (docstring 4. and 5.).
    assert compilation.compile_step(step, "cpu").options == \
        {"cpp.vec_isa_ok": True, "cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    assert settled == [1]
    step.inductor_options = {"cpp_wrapper": False}
    options = compilation.compile_step(step, "cpu").options
    assert options["cpp_wrapper"] is False and options["cpp_wrapper_build_separate"] is True
    assert compilation.compile_step(step, "cuda").options is None and settled == [1, 1]

"""How gen compiles a training step: one place for `gen train` and `gen bench`.

    stepped = compile_step(step, device)               # new_state, metrics = stepped(state, batch, inputs)
    stepped = compile_step(step, device, donate=True)  # metrics = stepped(state, batch, inputs);
                                                       # `state` now holds the next state
    stepped(state, batch, inputs)                      # the first call compiles
    with steady():                                     # later calls skip Dynamo: the graph is
        for ...: stepped(state, batch, inputs)         # called directly (3. and 7. below)

Seven choices, each measured on the 2-core CPU of bench/README.md:

1. One graph, static shapes: `torch.compile(step, fullgraph=True, dynamic=False)`.
   Every batch has the same shape and every varying number is a 0-d tensor, so
   the step compiles once (TORCH_NOTES.md, "What recompiles").
2. Donated buffers (`gen.optim.donate`): the fused optimizer kernels write the
   new parameters and moments into the old ones' memory, JAX's donate_argnums.
   VAE b128: 5.0 -> 4.6 ms a step.
3. Guards skipped once warm (`steady`): Dynamo checks every input tensor's
   dtype, shape and strides on each call to pick a compiled graph, about
   0.1-0.3 ms for a VAE's 30-odd state tensors. A training loop that has made
   its first call and feeds the same shapes forever has nothing to pick between,
   so after the first call it runs under torch.compiler.set_stance(
   skip_guard_eval_unsafe=True). "Unsafe" is the promise that no input would
   need another graph; the loop keeps it (fixed shapes, a fixed state tree).
   A tensor that breaks it is refused: torch raises "Recompilation triggered"
   instead of running the wrong graph. A Python value is not guarded that way
   (Dynamo ran the old graph for a scalar 3.0 traced as 2.0, the 2.0 baked in),
   so a compile_step call whose Python values differ from those of the call
   that last compiled has its guards checked even inside steady(), and
   compiles again (7., and
   tests/test_compilation.py); tests/test_train.py checks that a run builds one
   graph and matches eager.
4. The CPU vector-ISA probe, done once per cache directory (gen/vector_isa.py):
   Inductor's check of which SIMD instruction sets the compiler and CPU support
   costs about 1.1 s of every process, warm cache or not; gen records its verdict
   next to the compile cache and later processes trust the CPU's flags.
5. A C++ wrapper on the CPU (`cpp_wrapper`): the code that calls a compiled
   step's kernels and matmuls one after another is compiled C++ instead of
   Python. VAE b128: about 0.25 ms (6%) less a step; gan-2d's cold compile
   25 -> 19 s. On CUDA the default Python wrapper stays (CUDA graphs, not a C++
   wrapper, are what removes launch overhead there; bench/README.md).
   Built in two parts (`cpp_wrapper_build_separate`): by default gcc compiles
   the wrapper and every kernel as one file at -O3, and -O3 is what costs: on
   DCGAN's 4,900-line file gcc took 13.6 s at -O3 against 5.4 s at -O2. Apart,
   the wrapper (a list of calls) is built at -O1 and only the kernels at -O3.
   Cold compile probes, same machine, two rounds each: dcgan 36.8/34.6 ->
   27.7/23.9 s, conv-vae 25.0/25.5 -> 18.3/18.0 s, vae 16.7/16.8 -> 14.3/14.6 s,
   gan-2d 22.3/19.7 -> 20.5/18.3 s; warm compiles and step times unchanged
   within the machine's noise.

6. Channels-last on the CPU (`convolution_layout`): Inductor runs CPU convolutions
   channels-last (oneDNN's preferred layout) and otherwise converts every NCHW
   weight and image on each call. A state with convolution weights is handed to
   the compiled step channels-last, and so is each 4-D image batch; the donated
   update writes the new weights back in the same layout, so the graph stays
   the same from step to step. DCGAN b64, interleaved in one process: 1.24x ->
   1.35x the module peer; the conv VAE within noise. WGAN-GP and SNGAN on
   digits, 40 steps: the compiled channels-last run's metrics matched eager's
   to 5-6 digits. CPU only: on CUDA the updated weights came back in another
   layout than the one the graph was compiled for, and Inductor's stride
   assertion failed on the next call.
7. Dynamo left out once warm (`DirectStep`): with its guards skipped (3.) a call
   of a compiled function still enters Dynamo: a cache lookup and the rewritten
   frame that unpacks the dicts into the graph's inputs and packs its outputs
   back. Profiled, VAE b128: 0.11-0.17 ms and 0.10-0.16 ms of a 3.3-4 ms step.
   compile_step therefore compiles through its own backend (Inductor with the
   same options, so the same caches), which is handed the graph and the tensors
   Dynamo calls it with; the compiling call is recorded (which argument leaf
   feeds each graph input, which graph output each leaf of the result is), and
   inside steady() a call that matches the record (the same tree and non-tensor
   values, tensors that Dynamo's own tensor and global-state guards accept, the
   same tensors passed twice; DirectStep's docstring) is the compiled graph
   called on its leaves. Anything else goes through Dynamo. The checks cost about
   20 us a call for a 33-tensor state.
   In one process, interleaved with the same step through Dynamo under steady()
   (a slow phase of the machine): VAE b128 1.047x and 1.027x as fast, gan-2d
   b256 1.064x, WGAN-GP b256 1.028x, VAE b512 1.000x; VAE b32 1.029x and
   1.115x, gan-2d b64 1.123x and 1.073x.

One process, many compiled steps: Dynamo keeps at most 8 graphs per Python function
(torch._dynamo.config.recompile_limit), and every step compiled here goes through the
same functions (gen.optim.donate's wrapper, a family's step), so the ninth compile in a
process fails with FailOnRecompileLimitHit. `gen train` compiles once; the benchmark
calls torch._dynamo.reset() between its (model, batch) groups (seen on CUDA, and on the
CPU with five groups of two donated modes each).

What the step's own code avoids, because Dynamo re-traces its Python in every
new process, warm compile cache or not: einops and torch.utils._pytree. Dynamo
steps through einops' pattern parsing line by line, about 90 ms a call against
3 ms for the same `flatten`/`unflatten` (17 calls: 1.6-1.8 s against 0.05-0.06 s
to trace); pytree builds TreeSpec objects it must also trace. So the models
reshape with torch methods (the einops pattern in a comment where it helps) and
pass trees through gen.tree's `leaves`/`with_leaves`. WGAN-GP b256's warm
compile went from 5.9-6.7 to 4.9-5.4 s, cold from 29 to 26 s (interleaved probes).
"""

import getpass
import os
import re
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch._C._dynamo.guards import GlobalStateGuard, TensorGuards

from gen import optim, vector_isa
from gen.tree import Tree, leaves, tree_map

# Inductor options of every step compiled for the CPU (4. and 5. above); part of the FX graph
# cache's key, so the same in every process.
CPU_OPTIONS = {"cpp.vec_isa_ok": True, "cpp_wrapper": True, "cpp_wrapper_build_separate": True}


def compile_step(step: Callable, device: torch.device | str, donate: bool = False,
                 mode: str | None = None) -> Callable:
    """`step` compiled the way gen trains: one graph, static shapes; with `donate`, through
    optim.donate (returns only the metrics, writes the next state into `state`). Under
    steady() it calls its graph directly (7. above), except in a `mode` (CUDA graphs)."""
    on_cpu = torch.device(device).type == "cpu"
    options = None
    if on_cpu:
        require_cpp_compiler()  # else Inductor fails deep inside the first call
        vector_isa.trusted_vector_isa()
        # A step may override an option it cannot use (`step.inductor_options`, e.g. WGAN-GP's).
        options = {**CPU_OPTIONS, **getattr(step, "inductor_options", {})}
    if donate:
        step = optim.donate(step)
    if mode is not None:
        return torch.compile(step, fullgraph=True, dynamic=False, mode=mode, options=options)
    return DirectStep(step, options)


NO_COMPILE = "or train uncompiled (--no-compile)"


def require_cpp_compiler() -> None:
    """Inductor builds a CPU step's kernels with a C++ compiler ($CXX, else g++): without a
    working one, say so in one line before anything is traced."""
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError(_no_compiler()) from None


def _no_compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    return (f"compiling a step on the CPU needs a C++ compiler, and {compiler} does not run: install g++ "
            f"(or point $CXX at a working one), {NO_COMPILE}")


def build_failure(error: BaseException) -> str | None:
    """A one-line account of `error` when it is the C++ toolchain failing to build the step (the
    compiler's first error line, e.g. a missing Python.h), else None. Inductor wraps the
    compiler's error (InductorError.inner_exception, or the exception's cause or context)."""
    from torch._inductor import exc
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, exc.InvalidCxxCompiler):
            return _no_compiler()
        if isinstance(error, exc.CppCompileError):
            lines = [line.strip() for line in str(getattr(error, "output", "")).splitlines() if line.strip()]
            first = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no output")
            return (f"the C++ compiler could not build the compiled step ({first}): install the compiler and "
                    f"Python's development headers (e.g. python3-dev), {NO_COMPILE}")
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


class DirectStep:
    """A step under torch.compile (Inductor, `options`) that, once warm and inside steady(),
    calls its compiled graph directly instead of through Dynamo (7. above).

    The first call, and any call that does not match the recorded one, goes through
    Dynamo as usual. When that call compiles a graph (Dynamo then hands the backend the
    graph and the very tensors it will be called with), the call is recorded: which
    argument leaf feeds each graph input, and which graph output each tensor leaf of the
    result is. A later call inside steady() that matches the record is then the graph
    called on its leaves, and the result rebuilt around its outputs.

    A call matches what Dynamo's guards check for the graph: the same tree (container types,
    dict keys in order: the graph takes the leaves by position), non-tensor leaves of the same
    type and value, the same leaves passed as one tensor (Dynamo hands a tensor passed twice to
    the graph once), every tensor of the same type, dtype, device, shape, strides,
    requires_grad and dispatch keys (Dynamo's own TensorGuards), and the same global state
    (grad mode, autocast, ...: its GlobalStateGuard). Every tensor is checked on every call,
    the donated state's too: the same tensor object changed in place (`.data = ...double()`,
    `requires_grad_()`) is no longer what the graph was built for. A step whose compiling
    call changed its arguments' trees (a dict entry set: a Python side effect Dynamo replays
    after the graph) is not recorded. The record holds none of the recorded call's tensors,
    so it keeps no state or batch alive."""

    def __init__(self, step: Callable, options: dict | None):
        self.options = options
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=self.compile_graph)
        self.new_graph: dict | None = None  # what compile_graph saw during the current Dynamo call
        self.record: dict | None = None     # the call the direct path replays
        self.tree: list | None = None       # _flatten's tree of the last call that compiled

    def compile_graph(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """Dynamo's backend: Inductor, as torch.compile(options=...) runs it, keeping what the record needs."""
        from torch._inductor.compile_fx import compile_fx
        graph = compile_fx(graph_module, example_inputs, config_patches=self.options)
        seen = {"graph": graph, "inputs": list(example_inputs)}
        self.new_graph = seen

        def run(*graph_inputs):
            outputs = graph(*graph_inputs)
            if "inputs" in seen and "outputs" not in seen:  # the compiling call's outputs, to find in its result
                seen["outputs"] = outputs
            return outputs
        return run

    def __call__(self, *args):
        record = self.record
        if self.tree is not None and _steady.get():
            call_leaves, tree = _flatten(args)
            if tree != self.tree:
                # Another tree or Python value (a scalar 3.0 where 2.0 was traced): Dynamo with its
                # guards skipped would run the last graph, the old value baked in, and return a
                # wrong result without a word. So this call has its guards checked (and compiles
                # if no graph fits), recorded or not.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=False):
                    return self.call_dynamo(args)
            tensors = [leaf for leaf in call_leaves if isinstance(leaf, torch.Tensor)]
            if record is not None and _aliasing(tensors) == record["aliasing"] \
                    and record["tensors"].check(*tensors) and record["global_state"].check():
                sources = record["sources"]
                outputs = record["graph"](*[call_leaves[i] if i >= 0 else c for i, c in sources])
                return _rebuild(record["result"], (outputs[i] if i >= 0 else c for i, c in record["results"]))
        return self.call_dynamo(args)

    def call_dynamo(self, args: tuple):
        """The call through Dynamo (compiling if its guards ask), recording it if it compiled."""
        self.new_graph = None
        # What a later call must match, taken before this one: a donated step changes its arguments.
        before = GlobalStateGuard(), _flatten(args)
        try:
            result = self.compiled(*args)
            if self.new_graph is not None:
                self.record = _recording(self.new_graph, args, before, result)
                self.tree = before[1][1]
        except RuntimeError as error:
            problem = build_failure(error)  # the C++ toolchain: one line, not Inductor's pages
            if problem is None:
                raise
            raise ValueError(problem) from error
        finally:
            if self.new_graph is not None:  # Dynamo keeps `run`: let go of this call's tensors
                self.new_graph.pop("inputs", None), self.new_graph.pop("outputs", None)
            self.new_graph = None
        return result


def _recording(graph: dict, args: tuple, before: tuple, result) -> dict | None:
    """The record DirectStep replays, or None when the call cannot be replayed from its leaves
    (a tensor leaf of the result that is not a graph output, e.g. an argument handed back; an
    argument tree the call changed). A graph input that is no argument leaf (a tensor the step
    itself holds) is kept as is. `before`: the global state and _flatten(args) before the call."""
    global_state, (call_leaves, tree) = before
    if "outputs" not in graph:
        return None
    leaves_after, tree_after = _flatten(args)
    # A Python side effect on the arguments (a dict entry set) is Dynamo's to replay after the
    # graph, which a direct call would skip. Tensors' values may change (donation), not the tree.
    if tree_after != tree or any(a is not b for a, b in zip(leaves_after, call_leaves)):
        return None
    position = {id(leaf): i for i, leaf in enumerate(call_leaves) if isinstance(leaf, torch.Tensor)}
    # Each graph input: (index of the argument leaf, None), or (-1, tensor) for one held by the step itself.
    sources = [(position.get(id(t), -1), None if id(t) in position else t) for t in graph["inputs"]]
    outputs = {id(t): i for i, t in enumerate(graph["outputs"]) if isinstance(t, torch.Tensor)}
    results = []
    for leaf in _flatten(result)[0]:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in outputs:
                return None  # not a graph output (e.g. an argument handed back): Dynamo rebuilds it
            results.append((outputs[id(leaf)], None))
        else:
            results.append((-1, leaf))
    tensors = [leaf for leaf in call_leaves if isinstance(leaf, torch.Tensor)]
    # TensorGuards keeps each tensor's metadata, not the tensor (test_compilation.py checks none stays alive).
    return {"graph": graph["graph"], "sources": sources, "results": results,
            "result": _rebuild(result, iter([None] * len(results))),  # the structure only
            "aliasing": _aliasing(tensors), "global_state": global_state,
            "tensors": TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)}


_TENSOR = object()  # a tensor leaf's place in _flatten's tree


def _flatten(tree) -> tuple[list, list]:
    """(the leaves of nested dicts, lists and tuples, depth first in order; the tree without its
    tensors): the tree as a flat list, each dict as its keys in order, each list or tuple as its
    type and length, each tensor as a mark and each other leaf as its type and value (2, 2.0 and
    True are equal but trace differently)."""
    leaves, shape = [], []

    def walk(node):
        if isinstance(node, dict):
            shape.append((dict, tuple(node)))
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            shape.append((type(node), len(node)))
            for value in node:
                walk(value)
        else:
            leaves.append(node)
            shape.append(_TENSOR if isinstance(node, torch.Tensor) else (type(node), node))
    walk(tree)
    return leaves, shape


def _aliasing(tensors: list) -> list[int]:
    """For each tensor, the position of the first that is the same object: the graph of a call
    that passed one tensor twice takes it once, so it fits only calls that do the same."""
    first: dict[int, int] = {}
    return [first.setdefault(id(t), i) for i, t in enumerate(tensors)]


def _rebuild(template, values):
    """`template` with its leaves (in `_flatten`'s order) taken from the iterator `values`."""
    if isinstance(template, dict):
        return {key: _rebuild(value, values) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        items = [_rebuild(value, values) for value in template]
        # A namedtuple's constructor takes its fields as arguments, not one iterable.
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    return next(values)


def compile_for_training(step: Callable, state: Tree, device: torch.device | str, donate: bool = False,
                         mode: str | None = None) -> tuple[Callable, Tree, Callable]:
    """compile_step with the state laid out for it (6. above): (the compiled step, the state in
    its layout, the layout to give each batch). What gen train, the bench's compiled modes and
    the compile probe run."""
    layout = convolution_layout(state, device)
    return compile_step(step, device, donate=donate, mode=mode), layout(state), layout


def convolution_layout(state: Tree, device: torch.device | str) -> Callable:
    """How to lay out the state and each batch for the compiled step (6. above): on the CPU, when
    the state holds convolution weights (4-D tensors), every 4-D tensor of a tree, and a 4-D
    image batch, go channels-last; otherwise all stay as they are (`unchanged`), and so does a
    5-D batch of several critic updates' images. Only strides change: values, shapes and
    checkpoints (saved contiguous) are the same."""
    if torch.device(device).type != "cpu" or not any(t.ndim == 4 for t in leaves(state)):
        return unchanged
    return to_channels_last


def unchanged(x):
    return x


def to_channels_last(x: Tree | torch.Tensor) -> Tree | torch.Tensor:
    """Every 4-D tensor of a tree (or the tensor itself) in channels-last memory order."""
    return tree_map(channels_last, x) if isinstance(x, dict) else channels_last(x)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor (conv weights, an image batch) in channels-last memory order; others unchanged."""
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


_steady: ContextVar[bool] = ContextVar("gen_compilation_steady", default=False)


@contextmanager
def steady() -> Iterator[None]:
    """Compiled steps called inside run without Dynamo's guard checks (see 3. above), and a
    warm compile_step step calls its graph directly (7.). Enter it only after every compiled
    function involved has made its first call."""
    token = _steady.set(True)
    try:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            yield
    finally:
        _steady.reset(token)


def check_compile_cache() -> None:
    """Refuse a compile cache directory (TORCHINDUCTOR_CACHE_DIR, else Inductor's default) that
    cannot be created or written. gen train and gen bench check it first, compiling or not:
    importing torch._dynamo (the graph count, the bench's reset between groups) creates the
    directory, and an import that fails there leaves Dynamo half set up, which showed as
    "[Errno 2] No such file or directory" from an eager run and misleading bench rows, then a
    traceback. So this runs before that import, and works out Inductor's default as
    torch._inductor.runtime.cache_dir_utils does (importing that imports Dynamo)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    default = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    directory = os.path.abspath(given if given is not None else default)  # "" is the working directory
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, FileExistsError) or os.path.exists(directory) and not os.path.isdir(directory):
            reason = "it is not a directory"
        what = f"TORCHINDUCTOR_CACHE_DIR {directory}" if given is not None else f"the compile cache {directory}"
        fix = "set it to a writable directory or unset it" if given is not None else \
            "set TORCHINDUCTOR_CACHE_DIR to a writable directory"
        raise ValueError(f"{what} cannot be used ({reason}): {fix}") from None

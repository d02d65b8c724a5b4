"""Training throughput: gen's pure step compiled and eager, against an nn.Module peer.

For every model and batch size, each mode's full training step is built,
warmed up, and then timed in rounds: one repeat of every mode per round, the
order rotating between rounds, so the drift of a shared machine hits all
modes alike and their ratios stay meaningful (nanoGPT's bench.py: burn-in,
then time, synchronising the device).

    compiled   gen's pure step compiled as `gen train` runs it (gen/compilation.py): one graph,
               static shapes, the state's buffers donated, Dynamo's guards skipped once warm
    undonated  the plain torch.compile(step, fullgraph=True, dynamic=False): new state tensors
               every step, guards checked on every call
    eager      the same pure step, uncompiled
    module     bench/peers.py: nn.Module + torch.optim written as pytorch/examples writes it
    vmap-N     N independent models in one step: torch.compile(vmap(step)) over stacked states
    compiled-ro    CUDA only: mode="reduce-overhead" (CUDA graphs), the state kept in fixed buffers
    compiled-bf16  CUDA only: the compiled step under torch.autocast("cuda", dtype=torch.bfloat16)

A mode or model that raises is recorded as a row with an `error` field and
the run goes on; `time_budget` stops a run cleanly, keeping what it has.

Data and noise are synthetic, drawn once onto the device as tensors (a small
pool cycled through), so the numbers measure the step and nothing else; the
peers draw their noise inside the step, as their scripts do. samples/s counts
the real examples a step consumes (batch × batches per step × models).

Compile time is measured in fresh Python processes (`python -m gen.bench
--compile-probe ...`): *cold* with an empty TORCHINDUCTOR_CACHE_DIR, *warm*
with the directory the cold process filled — what the first and the second
run of `gen train` pay before the first step (torch/gen imports excluded,
the first call's step included). The timed `compiled` mode itself uses the
normal on-disk cache (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>),
so a second `gen bench` compiles warm; its own first-call time is `compile_s`.
"""

import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from gen import models
from gen.compilation import compile_step, steady
from gen.config import Config, resolve
from gen.tree import Tree, to_device, tree_map

# bench name -> (gen family, example shape, batch sizes timed by default)
MODELS = {
    "vae": ("vae", (1, 28, 28), (128, 512)),
    "conv-vae": ("conv-vae", (1, 28, 28), (128,)),
    "dcgan": ("dcgan", (1, 28, 28), (64,)),
    "gan-2d": ("gan", (2,), (256,)),
    "wgan-gp": ("wgan-gp", (2,), (256,)),
}
MODES = ("compiled", "undonated", "eager", "module")  # the default set
CUDA_MODES = ("compiled-ro", "compiled-bf16")  # asked for by name; skipped with a note on CPU
CHANNELS_LAST = ("conv-vae", "dcgan")  # conv models whose compiled step gets channels-last weights and images
POOL = 4  # distinct batches/noise draws cycled through, so no step sees the very same tensors twice in a row
PEERS_DIR = Path(__file__).resolve().parent.parent / "bench"


def is_compiled(mode: str) -> bool:
    return mode in ("compiled", "undonated") or mode.startswith(("compiled-", "vmap-"))


def resolve_device(name: str) -> torch.device:
    from gen.train import resolve_device as train_resolve_device
    return train_resolve_device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the machine ---------------------------------------------------------------------


def matmul_sampler(device: torch.device | str, size: int | None = None) -> Callable[[], float]:
    """A function that times one float32 (size × size) @ (size × size) product and returns its GFLOP/s.

    2·n³ FLOPs each; on CUDA TF32 stays at torch's default (off for matmul), so
    this is the true float32 rate the models' own matmuls compete with."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
    for _ in range(2):  # warm-up: thread pool, caches, clocks
        torch.mm(a, b, out=out)
    synchronize(device)

    def sample() -> float:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        return 2 * size ** 3 / (time.perf_counter() - start) / 1e9
    return sample


def matmul_peak_gflops(device: torch.device | str, size: int | None = None, repeats: int = 7) -> float:
    """float32 matmul GFLOP/s: the median of `repeats` timed square products (see matmul_sampler)."""
    sample = matmul_sampler(device, size)
    return median(sample() for _ in range(repeats))


def machine() -> dict:
    """What the numbers came from: CPU model, cores, threads, GPU, torch version, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- one model's pieces ---------------------------------------------------------------


def model_config(model: str, batch_size: int) -> tuple[models.Family, Config, tuple]:
    family_name, shape, _ = MODELS[model]
    family = models.get(family_name)
    config = resolve(Config(model=family_name, batch_size=batch_size), family.defaults)
    return family, config, shape


def synthetic_inputs(family: models.Family, config: Config, shape: tuple, device: torch.device,
                     seed: int = 0, models_stacked: int = 0) -> list[tuple]:
    """POOL (batch, inputs) pairs on the device: images uniform in [0, 1], points N(0, I).

    With `models_stacked` = N > 0 every tensor gains a leading axis of N (one
    batch and one noise draw per ensemble member)."""
    per_step = family.batches_per_step(config)
    leading = (per_step,) if per_step > 1 else ()
    pool = []
    for index in range(POOL):
        generator = torch.Generator().manual_seed(seed * 1000 + index)

        def one_draw():
            size = (*leading, config.batch_size, *shape)
            batch = torch.rand(size, generator=generator) if len(shape) == 3 else torch.randn(size, generator=generator)
            return batch, family.make_noise(config, shape, config.batch_size, generator)

        if models_stacked:
            draws = [one_draw() for _ in range(models_stacked)]
            batch = torch.stack([d[0] for d in draws])
            noise = {k: torch.stack([d[1][k] for d in draws]) for k in draws[0][1]}
        else:
            batch, noise = one_draw()
        pool.append((batch.to(device), to_device(noise, device)))
    return pool


def flops_per_step(model: str, config: Config, shape: tuple, batch: int) -> int:
    """FLOPs of one training step: FlopCounterMode over one eager step of gen's pure
    step (every forward and backward pass it makes, gradient penalties included).

    Counted are matmuls and convolutions (2 FLOPs per multiply-add); elementwise
    work — activations, losses, batch norm and the optimizer's updates — is not,
    as is usual for model FLOPs."""
    family = models.get(MODELS[model][0])
    config = resolve(Config(**{**config.to_dict(), "batch_size": batch}), family.defaults)
    state = family.init(config, shape, 0)
    (x, inputs), = synthetic_inputs(family, config, shape, torch.device("cpu"))[:1]
    step = family.make_step(config, shape)
    with FlopCounterMode(display=False) as counter:
        step(state, x, inputs)
    return counter.get_total_flops()


# --- modes: each a function that advances its own copy of the training state n steps ----


def load_peers():
    """bench/peers.py, found next to the gen package (bench/ is not installed with it); None if absent."""
    if not (PEERS_DIR / "peers.py").exists():
        return None
    if str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))
    import peers
    return peers


def stack_states(states: list[Tree]) -> Tree:
    """N states → one state whose every leaf has a leading model axis of N."""
    first = states[0]
    return {k: stack_states([s[k] for s in states]) if isinstance(v, dict) else torch.stack([s[k] for s in states])
            for k, v in first.items()}


def make_runner(mode: str, model: str, config: Config, shape: tuple, device: torch.device,
                seed: int = 0) -> Callable[[int], None]:
    """`advance(n)`: run n training steps in this mode. The state lives in the closure and is
    replaced (never mutated) each step; nothing is read back to the host."""
    family = models.get(MODELS[model][0])
    if mode == "module":
        peer = load_peers().build(model, config, shape, device)
        pool = [batch for batch, _ in synthetic_inputs(family, config, shape, device, seed)]

        def advance_module(n: int) -> None:
            for index in range(n):
                peer.step(pool[index % POOL])
        return advance_module

    step = family.make_step(config, shape)
    members = int(mode.split("-")[1]) if mode.startswith("vmap-") else 0
    if members:
        state = stack_states([to_device(family.init(config, shape, seed + i), device) for i in range(members)])
        step = compile_step(torch.func.vmap(step), device)
    else:
        state = to_device(family.init(config, shape, seed), device)
        if mode == "compiled-bf16":
            step = autocast_step(step, device)
        if is_compiled(mode):
            # "compiled" returns only the metrics and overwrites `state` in place (gen.optim.donate)
            step = compile_step(step, device, donate=mode == "compiled",
                                mode="reduce-overhead" if mode == "compiled-ro" else None)
    pool = synthetic_inputs(family, config, shape, device, seed, models_stacked=members)
    if is_compiled(mode) and not members and model in CHANNELS_LAST and device.type == "cpu":
        # Inductor runs CPU convolutions channels-last (oneDNN's preferred layout) and otherwise
        # converts every NCHW weight and image on each call; handing it channels-last tensors
        # removes those copies (dcgan b64: about 8% faster here). The updated weights come back
        # channels-last too, so the layout, and the graph, stay the same from step to step.
        # CPU only: on CUDA the updated weights came back in another layout than the one the
        # graph was compiled for, and Inductor's stride assertion failed on the next call.
        state = tree_map(channels_last, state)
        pool = [(channels_last(batch), inputs) for batch, inputs in pool]
    if mode == "compiled-ro":
        return cudagraph_runner(step, state, pool)
    if mode == "compiled":
        return donated_runner(step, state, pool)
    holder = {"state": state}

    def advance(n: int) -> None:
        state = holder["state"]
        for index in range(n):
            batch, inputs = pool[index % POOL]
            state, _ = step(state, batch, inputs)
        holder["state"] = state
    return advance


def donated_runner(stepped: Callable, state: Tree, pool: list) -> Callable[[int], None]:
    """`advance(n)` for the compiled mode, as gen train runs it: `stepped` (compiled
    gen.optim.donate(step)) overwrites `state` in place each call, the same dict and
    tensors throughout; every call after the very first runs under compilation.steady()."""
    calls = {"made": 0}

    def advance(n: int) -> None:
        index = 0
        if n and not calls["made"]:  # the first call compiles, with guards (nothing to skip yet)
            batch, inputs = pool[0]
            stepped(state, batch, inputs)
            index = 1
        with steady():
            for index in range(index, n):
                batch, inputs = pool[index % POOL]
                stepped(state, batch, inputs)
        calls["made"] += n
    return advance


def autocast_step(step: Callable, device: torch.device) -> Callable:
    """The step with its matmuls and convolutions in bfloat16 (torch.autocast inside the compiled
    function, so Dynamo traces it into the one graph). Params, moments and the optimizer's
    arithmetic stay float32; only autocast's op list (mm, conv, ...) runs in bf16."""
    def step_bf16(state, batch, inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(state, batch, inputs)
    return step_bf16


def cudagraph_runner(step: Callable, state: Tree, pool: list) -> Callable[[int], None]:
    """`advance(n)` for a step compiled with mode="reduce-overhead" (CUDA graphs).

    A replay writes its outputs into memory that the next replay reuses, and feeding
    those outputs straight back in as the next step's inputs is what has crashed
    (TORCH_NOTES.md; pytorch #160281). So the state lives in fixed buffers, marked
    static so the graph reads them in place instead of copying each one in, and
    after every replay the new state is copied into them with one _foreach_copy_
    — JAX's donation, done by hand. cudagraph_mark_step_begin() before each call
    tells the cudagraph tree that the previous step's outputs are dead."""
    buffers = flatten(state)
    for t in buffers:
        torch._dynamo.mark_static_address(t)

    def advance(n: int) -> None:
        for index in range(n):
            batch, inputs = pool[index % POOL]
            torch.compiler.cudagraph_mark_step_begin()
            new_state, _ = step(state, batch, inputs)
            torch._foreach_copy_(buffers, flatten(new_state))
    return advance


def flatten(tree: Tree) -> list[torch.Tensor]:
    """The leaves of a nested dict of tensors, in key order."""
    return [t for v in tree.values() for t in (flatten(v) if isinstance(v, dict) else [v])]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """4-D tensors (conv weights, image batches) in channels-last memory order; others unchanged."""
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


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


# --- compile time in fresh processes ----------------------------------------------------


def compile_probe(model: str, batch_size: int, device: str) -> float:
    """Seconds from building the compiled step to the end of its first call (compile + one step)."""
    family, config, shape = model_config(model, batch_size)
    device = resolve_device(device)
    state = to_device(family.init(config, shape, 0), device)
    (batch, inputs), = synthetic_inputs(family, config, shape, device)[:1]
    start = time.perf_counter()
    step = compile_step(family.make_step(config, shape), device, donate=True)  # as gen train compiles it
    step(state, batch, inputs)
    synchronize(device)
    return time.perf_counter() - start


def compile_seconds(model: str, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(cold, warm): compile_probe in a fresh process with an empty inductor cache, then in
    another fresh process reusing the cache the first one wrote."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="gen-bench-cache-") as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        for attempt in ("cold", "warm"):
            command = [sys.executable, "-m", "gen.bench", "--compile-probe", model, str(batch_size), device.type]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                                 cwd=str(Path(__file__).resolve().parent.parent))
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            if attempt == "warm" and not probe["cache"].get("inductor.fxgraph_cache_hit"):
                print(f"note: {model} b{batch_size}: the warm compile missed the FX graph cache ({probe['cache']})")
            seconds.append(probe["seconds"])
    return seconds[0], seconds[1]


# --- the harness ----------------------------------------------------------------------


def available_modes(modes: list[str] | None, device: torch.device | str = "cpu") -> list[str]:
    modes = list(modes or MODES)
    for mode in modes:
        if mode not in MODES + CUDA_MODES and not (mode.startswith("vmap-") and mode[5:].isdigit()
                                                   and int(mode[5:]) > 0):
            raise ValueError(f"unknown mode '{mode}': use compiled, undonated, eager, module, vmap-N (N models at once), "
                             f"or on CUDA {' or '.join(CUDA_MODES)}")
    if torch.device(device).type != "cuda":
        for mode in [m for m in modes if m in CUDA_MODES]:
            print(f"note: skipping mode '{mode}': it needs --device cuda")
            modes.remove(mode)
    if "module" in modes and load_peers() is None:
        print(f"note: skipping mode 'module': the peers live in {PEERS_DIR}/peers.py, which is absent "
              "(bench/ ships with the repository, not the installed package)")
        modes.remove("module")
    return modes


def available_models(names: list[str] | None) -> list[str]:
    names = list(names or MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown bench model '{unknown[0]}': use one of {', '.join(MODELS)}")
    registered = models.registry()
    present = [n for n in names if MODELS[n][0] in registered]
    for name in sorted(set(names) - set(present)):
        print(f"note: skipping '{name}': model family '{MODELS[name][0]}' is not registered in gen.models")
    return present


def plan(names: list[str] | None, batch_sizes: list[int] | None) -> list[tuple[str, int]]:
    """The (model, batch size) groups to time, in order. A name may carry its own batch
    sizes, `vae:128,4096`, which then override `batch_sizes` for that model, so one run
    can interleave models and sizes in priority order (bench/cuda.py does)."""
    entries = []
    for name in names or MODELS:
        model, _, sizes = name.partition(":")
        try:
            own = [int(b) for b in sizes.split(",")] if sizes else None
        except ValueError:
            raise ValueError(f"bad model entry '{name}': use MODEL or MODEL:B1,B2,...") from None
        if own is not None and any(b < 1 for b in own):
            raise ValueError(f"bad model entry '{name}': batch sizes must be at least 1")
        entries.append((model, own))
    present = set(available_models([model for model, _ in entries]))
    return [(model, b) for model, own in entries if model in present
            for b in own or batch_sizes or MODELS[model][2]]


def describe(error: BaseException) -> str:
    """One line for a failed mode: the exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def error_row(model: str, batch_size: int, mode: str, device: torch.device, error: str) -> dict:
    """A row for a mode that did not run: the timing fields empty, `error` saying why."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(model=model, batch_size=batch_size, mode=mode, device=device.type, error=error)
    return row


ROW_FIELDS = ("model", "batch_size", "mode", "device", "batches_per_step", "models", "steps", "repeats",
              "samples_per_s", "samples_per_s_min", "samples_per_s_max", "ms_per_step", "gflop_per_step",
              "gflops", "pct_of_peak", "peak_gflops", "first_call_s", "cold_compile_s", "warm_compile_s",
              "peak_memory_mb", "peak_memory_kind", "error")


def release(device: torch.device) -> None:
    """After a failed or finished group: free what it held, so the next one starts clean."""
    import gc
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as error:  # a sticky CUDA error: the next group will report its own failure
            print(f"note: CUDA clean-up failed: {describe(error)}")


def run(models_: list[str] | None, batch_sizes: list[int] | None, steps: int, repeats: int,
        device: torch.device | str, modes: list[str] | None, warmup: int = 3,
        measure_compile: bool = True, log: Callable[[str], None] = print,
        deadline: float | None = None, on_group: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One result dict per (model, batch size, mode); see bench/README.md for the fields.

    A mode that raises (building, compiling, warming up or in a timed round) gets a row
    with `error` set, and the others go on. `deadline` (time.monotonic() seconds): no
    new group, mode or round starts after it (at least one round runs for the modes
    already built), so the run ends close to it with what it has. `on_group(results)`
    is called after every (model, batch size) group, e.g. to write partial JSON."""
    device = torch.device(device)
    modes = available_modes(modes, device)
    groups = plan(models_, batch_sizes)
    out_of_time = (lambda: False) if deadline is None else (lambda: time.monotonic() >= deadline)
    # The peak is sampled at the start and once in every timing round, so it sees the same
    # machine load as the modes; rows get the median of all samples, filled in at the end.
    sample_peak = matmul_sampler(device)
    peak_samples = [sample_peak() for _ in range(7)]
    log(f"float32 matmul peak: {median(peak_samples):.1f} GFLOP/s (at start)")
    results = []
    for model, batch_size in groups:
        if out_of_time():
            log(f"{model} b{batch_size}: skipped, time budget spent")
            results += [error_row(model, batch_size, mode, device, "skipped: time budget spent") for mode in modes]
            continue
        results += time_group(model, batch_size, steps, repeats, device, modes, warmup, measure_compile,
                              log, out_of_time, sample_peak, peak_samples)
        release(device)
        fill_peak(results, peak_samples)
        if on_group:
            on_group(results)
    fill_peak(results, peak_samples)
    return results


def fill_peak(results: list[dict], peak_samples: list[float]) -> None:
    peak = median(peak_samples)
    for r in results:
        r["peak_gflops"] = peak
        r["pct_of_peak"] = None if r["gflops"] is None else 100 * r["gflops"] / peak


def time_group(model: str, batch_size: int, steps: int, repeats: int, device: torch.device, modes: list[str],
               warmup: int, measure_compile: bool, log: Callable[[str], None], out_of_time: Callable[[], bool],
               sample_peak: Callable[[], float], peak_samples: list[float]) -> list[dict]:
    """Build, warm up and time every mode of one (model, batch size); rows in `modes` order."""
    errors = {}
    try:
        family, config, shape = model_config(model, batch_size)
        per_step = family.batches_per_step(config)
    except Exception as error:
        log(f"{model} b{batch_size}: error: {describe(error)}")
        return [error_row(model, batch_size, mode, device, describe(error)) for mode in modes]
    try:
        flops = flops_per_step(model, config, shape, batch_size)
    except Exception as error:  # the rows still get their samples/s
        log(f"{model} b{batch_size}: FLOP count failed: {describe(error)}")
        flops = None
    cold = warm = None
    if measure_compile and "compiled" in modes and not out_of_time():
        log(f"{model} b{batch_size}: timing cold and warm compiles in fresh processes ...")
        try:
            cold, warm = compile_seconds(model, batch_size, device)
        except Exception as error:
            log(f"{model} b{batch_size}: compile probe failed: {describe(error)}")
    runners, first_call, memory = {}, {}, {}
    for mode in modes:
        if out_of_time():
            errors[mode] = "skipped: time budget spent"
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner = make_runner(mode, model, config, shape, device)
            first_call[mode] = time_mode(runner, 1, device)  # compiles the compiled modes
            time_mode(runner, warmup, device)
            memory[mode] = peak_memory_mb(device)
            runners[mode] = runner
        except Exception as error:
            errors[mode] = describe(error)
            log(f"{model} b{batch_size} {mode}: error: {errors[mode]}")
            release(device)
    built = [m for m in modes if m in runners]
    log(f"{model} b{batch_size}: {', '.join(built) or 'no mode'} built and warmed up; "
        f"timing {repeats} rounds of {steps} steps")
    seconds = {mode: [] for mode in built}
    for round_index in range(repeats):
        if round_index > 0 and out_of_time():
            log(f"{model} b{batch_size}: time budget spent after {round_index} of {repeats} rounds")
            break
        live = [m for m in built if m not in errors]
        order = live[round_index % max(len(live), 1):] + live[:round_index % max(len(live), 1)]
        for mode in order:
            try:
                seconds[mode].append(time_mode(runners[mode], steps, device))
            except Exception as error:
                errors[mode] = describe(error)
                log(f"{model} b{batch_size} {mode}: error while timing: {errors[mode]}")
        peak_samples.append(sample_peak())
    rows = []
    for mode in modes:
        if mode in errors:
            rows.append(error_row(model, batch_size, mode, device, errors[mode]))
            continue
        members = int(mode[5:]) if mode.startswith("vmap-") else 1
        samples = batch_size * per_step * members * steps
        rates = [samples / s for s in seconds[mode]]
        step_s = median(seconds[mode]) / steps
        gflops = None if flops is None else flops * members / step_s / 1e9
        rows.append({
            "model": model, "batch_size": batch_size, "mode": mode, "device": device.type,
            "batches_per_step": per_step, "models": members, "steps": steps, "repeats": len(rates),
            "samples_per_s": median(rates), "samples_per_s_min": min(rates),
            "samples_per_s_max": max(rates), "ms_per_step": 1000 * step_s,
            "gflop_per_step": None if flops is None else flops * members / 1e9, "gflops": gflops,
            "pct_of_peak": None, "peak_gflops": None,
            "first_call_s": first_call[mode],
            "cold_compile_s": cold if mode == "compiled" else None,
            "warm_compile_s": warm if mode == "compiled" else None,
            "peak_memory_mb": memory[mode],
            "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
            "error": None,
        })
    return rows


def speedups(results: list[dict], reference: str = "module") -> dict[tuple, float]:
    """(model, batch, mode) -> samples/s relative to the reference mode of the same row group."""
    ok = [r for r in results if r.get("error") is None]
    base = {(r["model"], r["batch_size"]): r["samples_per_s"] for r in ok if r["mode"] == reference}
    return {(r["model"], r["batch_size"], r["mode"]): r["samples_per_s"] / base[(r["model"], r["batch_size"])]
            for r in ok if (r["model"], r["batch_size"]) in base}


def print_table(results: list[dict], machine_info: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ratio = speedups(results)
    title = "gen bench"
    if machine_info:
        title += f" — {machine_info['cpu']}, {machine_info['cores']} cores, torch {machine_info['torch']}"
        if machine_info.get("gpu"):
            title += f", {machine_info['gpu']}"
    table = Table(title=title)
    for column in ("model", "batch", "mode", "samples/s (min–max)", "× module", "ms/step", "GFLOP/s",
                   "% peak", "compile cold/warm s", "first call s", "peak MB"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")

    def number(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in results:
        if r.get("error") is not None:
            table.add_row(r["model"], str(r["batch_size"]), r["mode"], f"[red]{r['error'][:80]}[/red]",
                          *[""] * 7)
            continue
        key = (r["model"], r["batch_size"], r["mode"])
        compile_cell = (f"{r['cold_compile_s']:.1f} / {r['warm_compile_s']:.1f}"
                        if r["cold_compile_s"] is not None else "")
        table.add_row(r["model"], str(r["batch_size"]), r["mode"],
                      f"{r['samples_per_s']:,.0f} ({r['samples_per_s_min']:,.0f}–{r['samples_per_s_max']:,.0f})",
                      f"{ratio[key]:.2f}" if key in ratio else "", f"{r['ms_per_step']:.2f}",
                      number(r["gflops"], ".1f"), number(r["pct_of_peak"], ".0f") + ("%" if r["pct_of_peak"] else ""),
                      compile_cell, f"{r['first_call_s']:.1f}", f"{r['peak_memory_mb']:.0f}")
    console = Console()
    console.print(table)
    if results:
        kind = "CUDA max allocated" if results[0]["device"] == "cuda" else "process max RSS so far (CPU)"
        console.print(f"peak MB: {kind}; float32 matmul peak {results[0]['peak_gflops']:.1f} GFLOP/s")


def main(models: list[str] | None = None, batch_sizes: list[int] | None = None, steps: int = 20,
         repeats: int = 5, device: str = "auto", json_path: str | None = None,
         modes: list[str] | None = None, measure_compile: bool = True,
         time_budget: float | None = None) -> list[dict]:
    """What `gen bench` and `python bench/run.py` run: time, print a table, optionally write JSON.

    With `time_budget` seconds the run starts nothing new once they are spent (see `run`).
    The JSON file is rewritten after every (model, batch size) group, so a run killed
    from outside still leaves the groups it finished; an interrupt (Ctrl-C, or SIGTERM
    where bench/run.py turns it into one) prints and writes what was done."""
    if steps < 1 or repeats < 1:
        raise ValueError("--steps and --repeats must be at least 1")
    if batch_sizes and any(b < 1 for b in batch_sizes):
        raise ValueError("--batch-size must be at least 1")
    if time_budget is not None and time_budget <= 0:
        raise ValueError("--time-budget must be positive")
    deadline = None if time_budget is None else time.monotonic() + time_budget
    torch_device = resolve_device(device)
    keep_freed_memory()
    info = machine()
    if time_budget is not None:
        info["time_budget_s"] = time_budget

    def write(results: list[dict], complete: bool) -> None:
        if json_path:
            info["complete"] = complete
            Path(json_path).write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")

    results: list[dict] = []

    def keep(partial: list[dict]) -> None:
        results[:] = partial
        write(partial, complete=False)

    try:
        results = run(models, batch_sizes, steps, repeats, torch_device, modes, measure_compile=measure_compile,
                      deadline=deadline, on_group=keep)
        complete = True
    except KeyboardInterrupt:
        print("interrupted: writing the groups finished so far")
        complete = False
    info["load_average_after"] = machine().get("load_average")
    print_table(results, info)
    write(results, complete)
    return results


if __name__ == "__main__":
    # The compile-time probe run by compile_seconds: python -m gen.bench --compile-probe MODEL BATCH DEVICE
    if len(sys.argv) == 5 and sys.argv[1] == "--compile-probe":
        seconds = compile_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        from torch._dynamo.utils import counters
        hits = {f"{group}.{name}": n for group in ("inductor", "aot_autograd") for name, n in counters[group].items()
                if "cache" in name}
        print(json.dumps({"seconds": seconds, "cache": hits}))
    else:
        sys.exit("usage: python -m gen.bench --compile-probe MODEL BATCH DEVICE (use `gen bench` to benchmark)")

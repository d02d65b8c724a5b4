"""The harness: plan the (model, batch size) groups, build and time every mode in interleaved
rounds, turn failures into error rows; `main` runs it and writes the table and the JSON
(gen/bench/report.py)."""

import json
import math
import os
import time
import traceback
from statistics import median
from typing import Callable

import torch

from gen import checkpoint, compilation, models
from gen.bench.compile_time import compile_seconds
from gen.bench.machine import fastest, keep_freed_memory, machine, matmul_samplers, peak_memory_mb, time_mode
from gen.bench.modes import CUDA_MODES, EXTRA_MODES, MODELS, MODES, PEERS_DIR, POOL, flops_per_step, \
    load_peers, make_runner, model_config
from gen.bench.report import json_target, print_table, refuse_to_replace, speedups
from gen.config import MAX_SIZE
from gen.device import memory_bytes, resolve_device
from gen.tree import leaves


def available_modes(modes: list[str] | None, device: torch.device | str = "cpu") -> list[str]:
    modes = list(dict.fromkeys(modes or MODES))  # a mode named twice is timed once (its rounds would mix)
    for mode in modes:
        if mode not in MODES + EXTRA_MODES and not (mode.startswith("vmap-") and mode[5:].isdigit()
                                                    and int(mode[5:]) > 0):
            raise ValueError(f"unknown mode '{mode}': use compiled, undonated, eager, module, vmap-N (N models at once), "
                             f"compiled-bf16, or on CUDA {' or '.join(CUDA_MODES)}")
    if torch.device(device).type != "cuda":
        for mode in [m for m in modes if m in CUDA_MODES]:
            print(f"note: skipping mode '{mode}': it needs --device cuda")
            modes.remove(mode)
    if "module" in modes and load_peers() is None:
        print(f"note: skipping mode 'module': the peers live in {PEERS_DIR}/peers.py, which is absent "
              "(bench/ ships with the repository, not the installed package)")
        modes.remove("module")
    if not modes:
        raise ValueError("no mode left to run on this device: add --mode compiled, eager or module")
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
    groups = [(model, b) for model, own in entries if model in present
              for b in own or batch_sizes or MODELS[model][2]]
    too_large = [b for _, b in groups if b > MAX_SIZE]  # past int64 torch raises TypeError, not a message
    if too_large:
        raise ValueError(f"batch size {too_large[0]} is too large: the most is {MAX_SIZE:,}, and far less fits "
                         "in memory")
    for model, batch_size in groups:  # the model's own refusals now, not as error rows after the others ran
        try:
            model_config(model, batch_size)
        except ValueError as error:
            raise ValueError(f"{model} b{batch_size}: {error}") from None
    return list(dict.fromkeys(groups))  # a group named twice is timed once


def check_memory(model: str, batch_size: int, members: int, device: torch.device) -> None:
    """Refuse a group whose input pool and state alone would not fit in the device's memory: past it
    the kernel kills the process (no message, no JSON). Activations, left out, only add to it.

        bytes ≈ members · (POOL · batches_per_step · B · |example| + 2 · |state|) · 4"""
    family, config, shape = model_config(model, batch_size)
    inputs = POOL * family.batches_per_step(config) * batch_size * math.prod(shape)
    state = sum(leaf.numel() for leaf in leaves(family.init(config, shape, 0)))  # params and optimizer moments
    needed = members * (inputs + 2 * state) * 4  # float32; the state and the update written beside it
    available = memory_bytes(device)
    if needed > available:
        models_part = f", {members:,} models at once" if members > 1 else ""
        raise ValueError(f"{model} b{batch_size}{models_part} needs more than {needed / 1e9:,.1f} GB, and this "
                         f"{device.type.upper()} has {available / 1e9:,.1f} GB: use a smaller batch size"
                         + (" or fewer models (vmap-N)" if members > 1 else ""))


def report(log: Callable[[str], None], where: str, error: BaseException) -> str:
    """Log a failure as one line and return that line; with GEN_BENCH_TRACEBACKS=1 in the environment
    (bench/cuda.sh sets it: nobody can rerun that machine's failures) the traceback follows."""
    line = describe(error)
    log(f"{where}: error: {line}")
    if os.environ.get("GEN_BENCH_TRACEBACKS") == "1":
        log("".join(traceback.format_exception(error)).rstrip())
    return line


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
              "peak_memory_mb", "peak_memory_kind", "round_seconds", "vs_module", "paired_vs_module",
              "first_step_vs_eager", "second_step_vs_eager", "error")
# How far a mode's first- or second-step metrics may be from eager's before the log warns (step_differences).
STEP_TOLERANCE = {"compiled-bf16": 5e-2}
STEP_DEFAULT_TOLERANCE = 1e-3


def step_differences(runners: dict[str, Callable], step: str = "first") -> dict[str, float]:
    """How far each gen mode's first (or second) step is from eager's: every gen mode starts from
    the same state and batches, so their metrics on those steps (losses, means of logits, ...)
    should agree to rounding (bf16: to bf16's precision); the second also checks the update in
    between. Per mode, the largest over the metrics of

        |m − m_eager| / max(1, |m_eager|)

    (relative for large values such as a VAE's summed loss, absolute near zero); inf if a metric
    is not finite. Modes whose metrics differ in name or shape from eager's (vmap-N, the module
    peer) are left out, and nothing is compared without an eager mode."""
    attribute = f"{step}_step_metrics"
    reference = getattr(runners.get("eager"), attribute, None)
    if not reference:
        return {}
    differences = {}
    for mode, runner in runners.items():
        metrics = getattr(runner, attribute, None)
        if mode == "eager" or not metrics or metrics.keys() != reference.keys() or \
                any(metrics[k].shape != reference[k].shape for k in reference):
            continue
        largest = 0.0
        for name, expected in reference.items():
            expected, got = expected.cpu().double(), metrics[name].cpu().double()
            difference = float(((got - expected).abs() / expected.abs().clamp(min=1)).max())
            largest = max(largest, difference if difference == difference else float("inf"))  # NaN → inf
        differences[mode] = largest
    return differences


def release(device: torch.device) -> None:
    """After a failed mode or a finished group: free what it held, so the next one starts clean."""
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
        deadline: float | None = None, on_group: Callable[[list[dict]], None] | None = None,
        info: dict | None = None) -> list[dict]:
    """One result dict per (model, batch size, mode); see bench/README.md for the fields.

    A mode that raises (building, compiling, warming up or in a timed round) gets a row
    with `error` set, and the others go on. `deadline` (time.monotonic() seconds): no
    new group, mode or round starts after it (at least one round runs for the modes
    already built), so the run ends close to it with what it has. `on_group(results)`
    is called after every (model, batch size) group, e.g. to write partial JSON. `info` (the
    JSON's machine record), if given, gets each matmul library's GFLOP/s at the start."""
    device = torch.device(device)
    modes = available_modes(modes, device)
    groups = plan(models_, batch_sizes)
    members = max([int(mode[5:]) for mode in modes if mode.startswith("vmap-")] or [1])
    for model, batch_size in groups:
        check_memory(model, batch_size, members, device)
    out_of_time = (lambda: False) if deadline is None else (lambda: time.monotonic() >= deadline)
    # The peak is sampled at the start and once in every timing round, so it sees the same
    # machine load as the modes; rows get the median of all samples, filled in at the end.
    # On the CPU each sample is the faster of torch.mm and oneDNN (gen.bench.machine.matmul_samplers).
    libraries = matmul_samplers(device)
    samples = {library: [sample() for _ in range(7)] for library, sample in libraries.items()}
    peak_samples = [max(rates) for rates in zip(*samples.values())]
    sample_peak = fastest(libraries)
    by_library = {library: round(median(rates), 1) for library, rates in samples.items()}
    log(f"float32 matmul peak: {median(peak_samples):.1f} GFLOP/s at start ("
        + ", ".join(f"{library} {gflops}" for library, gflops in by_library.items()) + ")")
    if info is not None:
        info["matmul_gflops_at_start"] = by_library
    results = []
    for model, batch_size in groups:
        if out_of_time():
            log(f"{model} b{batch_size}: skipped, time budget spent")
            results += [error_row(model, batch_size, mode, device, "skipped: time budget spent") for mode in modes]
            continue
        results += time_group(model, batch_size, steps, repeats, device, modes, warmup, measure_compile,
                              log, out_of_time, sample_peak, peak_samples)
        # Dynamo keeps compiled graphs per Python code object, at most 8 (recompile_limit), and every
        # group compiles the same few functions again (gen.optim.donate's wrapper, each family's
        # step) for new shapes: without a reset the ninth compile of a run fails (gan-2d, the fifth
        # group of a bf16 run). The reset also drops the finished group's CUDA graphs.
        torch._dynamo.reset()
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
        line = report(log, f"{model} b{batch_size}", error)
        return [error_row(model, batch_size, mode, device, line) for mode in modes]
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
            report(log, f"{model} b{batch_size} compile probe", error)
    runners, first_call, memory = {}, {}, {}
    for mode in modes:
        if out_of_time():
            errors[mode] = "skipped: time budget spent"
            continue
        try:
            # CUDA: what this mode allocates on top of what is already held (the peak's matrices, the
            # modes built before it), so each row is its own figure.
            held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner = make_runner(mode, model, config, shape, device)
            first_call[mode] = time_mode(runner, 1, device)  # compiles the compiled modes
            time_mode(runner, warmup, device)
            memory[mode] = peak_memory_mb(device) - held / 2 ** 20
            runners[mode] = runner
        except Exception as error:
            errors[mode] = report(log, f"{model} b{batch_size} {mode}", error)
            release(device)
    built = [m for m in modes if m in runners]
    differences = {}
    for step in ("first", "second"):
        try:
            differences[step] = step_differences(runners, step)
        except Exception as error:  # e.g. a sticky CUDA error: the modes' own rows will say so
            report(log, f"{model} b{batch_size} {step}-step check", error)
            differences[step] = {}
        if differences[step]:
            log(f"{model} b{batch_size}: {step} step against eager's, largest |m - m_eager| / max(1, |m_eager|) "
                "over the metrics: " + ", ".join(f"{mode} {value:.1e}" for mode, value in differences[step].items()))
        for mode, value in differences[step].items():
            if not value <= STEP_TOLERANCE.get(mode, STEP_DEFAULT_TOLERANCE):
                log(f"{model} b{batch_size} {mode}: warning: its {step} step's metrics differ from eager's "
                    f"by {value:.1e}")
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
                errors[mode] = report(log, f"{model} b{batch_size} {mode} while timing", error)
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
            "round_seconds": seconds[mode],
            "vs_module": None,  # filled in below, once the group's module row is known
            "paired_vs_module": paired_ratio(seconds.get("module", []), seconds[mode]),
            "first_step_vs_eager": differences["first"].get(mode),
            "second_step_vs_eager": differences["second"].get(mode),
            "error": None,
        })
    ratios = speedups(rows)
    for row in rows:
        row["vs_module"] = ratios.get((model, batch_size, row["mode"]))
    return rows


def paired_ratio(reference_seconds: list[float], mode_seconds: list[float]) -> float | None:
    """The median over rounds of (reference's time / this mode's time) in the same round.

    "× module" divides two medians taken over the whole run; on a machine whose
    speed drifts between rounds, the ratio within each round (the modes ran
    seconds apart) cancels the drift, and its median is the steadier figure.
    Round i of each list is the same round: a mode that fails stops adding."""
    pairs = [r / m for r, m in zip(reference_seconds, mode_seconds)]
    return median(pairs) if pairs else None


def main(models: list[str] | None = None, batch_sizes: list[int] | None = None, steps: int = 20,
         repeats: int = 5, device: str = "auto", json_path: str | None = None,
         modes: list[str] | None = None, measure_compile: bool = True,
         time_budget: float | None = None) -> list[dict]:
    """What `gen bench` and `python bench/run.py` run: time, print a table, optionally write JSON.

    With `time_budget` seconds the run starts nothing new once they are spent (see `run`).
    The JSON file is rewritten after every (model, batch size) group, so a run killed
    from outside still leaves the groups it finished; an interrupt (Ctrl-C, or SIGTERM
    where bench/run.py turns it into one) prints and writes the groups finished, then
    raises KeyboardInterrupt again; with none finished an existing file is left as it was."""
    if steps < 1 or repeats < 1:
        raise ValueError("--steps and --repeats must be at least 1")
    if batch_sizes and any(b < 1 for b in batch_sizes):
        raise ValueError("--batch-size must be at least 1")
    if time_budget is not None and not 0 < time_budget < float("inf"):  # nan compares false: it meant no budget
        raise ValueError(f"--time-budget {time_budget} is not a positive number of seconds: give one, e.g. 300")
    target = None if json_path is None else json_target(json_path)  # checked now, not after the run
    compilation.check_compile_cache()
    deadline = None if time_budget is None else time.monotonic() + time_budget
    torch_device = resolve_device(device)
    keep_freed_memory()
    info = machine()
    if time_budget is not None:
        info["time_budget_s"] = time_budget

    def write(results: list[dict], complete: bool) -> None:
        if target is not None:
            info["complete"] = complete
            text = json.dumps(checkpoint.json_safe({"machine": info, "results": results}), indent=2, allow_nan=False)
            try:
                refuse_to_replace(json_path)  # it may have changed since the run began
                checkpoint.write_text(target, text + "\n")  # whole or not at all, as every file gen writes
            except ValueError as error:
                print(f"note: not writing: {error}")
            except OSError as error:  # e.g. the disk filled up mid-run: the timing goes on, the table is printed
                print(f"note: could not write the results ({error}); the previous copy is kept")

    results: list[dict] = []

    def keep(partial: list[dict]) -> None:
        results[:] = partial
        write(partial, complete=False)

    try:
        results = run(models, batch_sizes, steps, repeats, torch_device, modes, measure_compile=measure_compile,
                      deadline=deadline, on_group=keep, info=info)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
        if results:
            print("interrupted: writing the groups finished so far")
        else:  # an empty file must not replace the results of an earlier run
            left = "" if target is None else \
                f": {json_path} left as it was" if target.exists() else ": nothing written"
            print(f"interrupted before any group finished{left}")
    info["load_average_after"] = machine().get("load_average")
    print_table(results, info)
    if results or not interrupted:
        write(results, complete=not interrupted)
    if interrupted:
        raise KeyboardInterrupt  # what was done is printed and written; the caller exits as interrupted
    return results


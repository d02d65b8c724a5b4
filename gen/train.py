"""The training loop: any model family, one compiled step, a run folder on disk
(gen/run_folder.py: its files, and the rules that keep them whole).

The step is built once, compiled once (gen/compilation.py: one graph, static
shapes, the state's buffers donated, Dynamo's guards skipped once warm) and
then called with tensors only: the batch, a state dict whose key order never
changes, and the step's random inputs drawn outside it from (seed, step).
Every batch has the same shape (the ragged last batch is dropped), so the
graph is compiled exactly once; the summary reports how many graphs Dynamo
built so a regression shows. Because the data order derives from (seed,
epoch) and the noise from (seed, step), a resumed run continues with exactly
the numbers the uninterrupted run would have seen.

A donated step overwrites the state in place, so a step stopped halfway would
leave a state that is neither the old one nor the new one. Ctrl-C therefore
takes effect at the next step boundary (the checkpoint saved then is a whole
step's state); a second Ctrl-C stops at once and keeps the last checkpoint
on disk, never writing a half-updated state.
"""

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from gen import checkpoint, compilation, data, models, plots, rng, run_folder
from gen.config import Config, resolve, validate
from gen.device import autocast_step, resolve_device, synchronize
from gen.tree import leaves, to_device


def prepare(config: Config) -> tuple[Config, models.Family, data.Dataset]:
    """Resolve defaults, check the config, load the data; every failure is a one-line error."""
    family = models.get(config.model)
    config = resolve(config, family.defaults)
    validate(config)
    dataset = data.load(config.data, config.data_dir, config.seed)
    if config.epochs is None and config.steps is None:
        if dataset.default_epochs and "epochs" in family.defaults:
            config = replace(config, epochs=dataset.default_epochs)
        else:
            config = replace(config, **{k: v for k, v in family.defaults.items() if k in ("epochs", "steps")})
    if dataset.kind not in family.data_kinds:
        wanted = "images" if "image" in family.data_kinds else "2D points"
        raise ValueError(f"model '{config.model}' trains on {wanted} but '{config.data}' is "
                         f"{'2D points' if dataset.kind == 'points' else 'images'}: pick a matching --data")
    multiple = family.image_side_multiple
    if dataset.kind == "image" and any(side % multiple for side in dataset.shape[1:]):
        height, width = dataset.shape[1:]
        raise ValueError(f"model '{config.model}' needs image sides divisible by {multiple} but '{config.data}' "
                         f"has {height}x{width} images: pad or crop them, or train the MLP 'vae' or 'gan'")
    if dataset.kind == "image" and not family.hidden_dim_on_images:
        # The family's default width is for its MLPs on 2D points; recorded here it would claim a
        # setting the run does not have (the CLI refuses a --hidden-dim given for it).
        config = replace(config, hidden_dim=None)
    return config, family, dataset


def train(config: Config, out: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train to the configured length; returns a summary (final metrics, timings, compile count)."""
    compilation.check_compile_cache()  # before anything imports Dynamo, compiling or not
    config, family, dataset = prepare(config)
    out = Path(out)
    checkpoint_path = out / run_folder.CHECKPOINT
    run_folder.check(out, resume)
    device = resolve_device(config.device)
    shape = dataset.shape
    per_step = family.batches_per_step(config)
    config, steps_per_epoch, total_steps = _run_length(config, len(dataset.train), per_step)
    state = to_device(family.init(config, shape, config.seed), device)
    start_step = 0
    if resume:
        state, start_step = _resumed_state(checkpoint_path, config, shape, state, total_steps)
    run_folder.create(out)
    with run_folder.lock(out):
        # Checked again under the lock: another process may have written here since the checks above.
        run_folder.check(out, resume)
        if resume and checkpoint.read_metadata(checkpoint_path)["step"] != start_step:
            raise ValueError(f"the checkpoint in {out} changed while this run started (another gen process?): "
                             "run the command again")
        run_folder.write_json(out / run_folder.CONFIG, config.to_dict())
        history = run_folder.restart_metrics(out, start_step)
        metadata = {"model": config.model, "config": config.to_dict(), "data_kind": dataset.kind,
                    "shape": list(shape), "steps_per_epoch": steps_per_epoch}
        step_fn, state, layout = _training_step(family, config, shape, state, device)
        graphs_before = _graph_count()
        train_data = dataset.train.to(device)

        saved_step = start_step if resume else None  # the step the checkpoint on disk holds

        def save(step: int) -> None:
            nonlocal saved_step
            # A diverged state (NaN or infinite anywhere) is never saved: it would replace the last good
            # checkpoint with one that can only produce NaN samples.
            if not all(torch.isfinite(t).all() for t in leaves(state)):
                _diverged(checkpoint_path, step, "the model's state")
            checkpoint.save(checkpoint_path, state, {**metadata, "step": step, "epoch": step / steps_per_epoch})
            saved_step = step

        progress = _progress(show_progress)
        task = progress.add_task(f"{config.model} on {config.data}", total=total_steps, completed=start_step,
                                 status="")
        compile_seconds = None
        interval_start, interval_steps = None, 0
        steps_done = start_step  # the steps `state` holds; it lags the loop's `step` while a step runs
        state_is_whole = True  # False only while a step is writing it
        interrupt = _InterruptAtStepBoundary()
        try:
            with progress, interrupt:
                for step in range(start_step, total_steps):
                    interrupt.raise_if_requested()
                    epoch, index = divmod(step, steps_per_epoch)
                    batch = layout(_batch(train_data, config, per_step, epoch, index))
                    inputs = family.make_noise(config, shape, config.batch_size,
                                               rng.generator(config.seed, "noise", step))
                    inputs = {name: value.to(device) for name, value in inputs.items()}
                    tick = time.perf_counter()
                    # After the first (compiling) call the compiled step runs without Dynamo's guard checks.
                    with compilation.steady() if config.compile and compile_seconds is not None else nullcontext():
                        state_is_whole = False
                        state, metrics = step_fn(state, batch, inputs)
                        state_is_whole, steps_done = True, step + 1
                    if compile_seconds is None:  # the first call compiles; time it apart from throughput
                        synchronize(device)
                        compile_seconds = time.perf_counter() - tick
                        interval_start, interval_steps = time.perf_counter(), 0
                    else:
                        interval_steps += 1
                    progress.advance(task)
                    done = step + 1
                    end_of_epoch = done % steps_per_epoch == 0 or done == total_steps
                    if done % config.log_every == 0 or end_of_epoch:
                        row = {name: value.item() for name, value in metrics.items()}  # the only host syncs
                        # Throughput over the steps since the last row, the compiling call left out; when
                        # that call is the only one (a process's first step is a logging step), its own time.
                        steps_timed, seconds = ((interval_steps, time.perf_counter() - interval_start) if interval_steps
                                                else (1, compile_seconds))
                        row = {"step": done, "epoch": round(done / steps_per_epoch, 4), **row,
                               "samples_per_s": round(steps_timed * config.batch_size * per_step / seconds, 1)}
                        run_folder.append_metrics(out, row, history)
                        if not all(math.isfinite(value) for value in row.values()):
                            _diverged(checkpoint_path, done, "the logged metrics")
                        progress.update(task, status=_status(row))
                        interval_start, interval_steps = time.perf_counter(), 0
                    if config.sample_every and done % config.sample_every == 0:
                        (out / "samples").mkdir(exist_ok=True)
                        _save_samples(family, state, config, dataset, out / "samples" / f"step_{done:07d}.png")
                    if end_of_epoch:
                        results = family.evaluate(state, config, dataset, rng.seed_for(config.seed, "eval"))
                        if results:
                            evaluation_row = {"step": done, "epoch": round(done / steps_per_epoch, 4), **results}
                            run_folder.append_metrics(out, evaluation_row, history)
                        save(done)
                        interval_start = time.perf_counter()  # evaluation is not training time
                interrupt.raise_if_requested()  # a Ctrl-C held through the last step stops the run too
        except KeyboardInterrupt:
            if state_is_whole and saved_step != steps_done:
                save(steps_done)
            raise KeyboardInterrupt(_interrupted(out, steps_done, total_steps, state_is_whole)) from None
        finally:
            progress.stop()

        _save_samples(family, state, config, dataset, out / "samples.png")
        # Training rows carry a throughput; evaluation rows (test losses, mode coverage) do not.
        training_rows = [row for row in history if "samples_per_s" in row]
        with checkpoint.replacing(out / "loss.png") as temporary:  # a crash leaves the old picture or the new
            plots.loss_curves(training_rows, temporary, title=f"{config.model} on {config.data}")
        evaluation = next((row for row in reversed(history) if "samples_per_s" not in row), {})
        summary = {"out": str(out), "steps": total_steps, "device": str(device), "compiled": config.compile,
                   "compile_seconds": compile_seconds, "graphs_compiled": _graph_count() - graphs_before,
                   "final": training_rows[-1] if training_rows else {}, "evaluation": evaluation}
        run_folder.write_json(out / run_folder.SUMMARY, summary)
        return summary


# --- the run's parts, in the order train() uses them -----------------------------------


def _run_length(config: Config, train_size: int, per_step: int) -> tuple[Config, int, int]:
    """(config, steps per epoch, total steps); a decaying schedule's length is fixed here (saved
    with the run's config, so a resume decays alike)."""
    steps_per_epoch = data.batches_per_epoch(train_size, config.batch_size * per_step)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} (x{per_step} batches per step) exceeds the "
                         f"{train_size} training examples: use a smaller --batch-size")
    total_steps = config.steps or config.epochs * steps_per_epoch
    if config.lr_schedule != "constant" and config.decay_steps is None:
        config = replace(config, decay_steps=total_steps)
    if config.lr_schedule != "constant" and total_steps > config.decay_steps:
        # Past its end a decay schedule gives lr 0: the extra steps would change nothing.
        raise ValueError(f"the run's {config.lr_schedule} learning-rate schedule reaches 0 at step "
                         f"{config.decay_steps}, and this run asks for {total_steps} steps: a resume cannot "
                         "lengthen a decaying run; start a new run with the longer length")
    return config, steps_per_epoch, total_steps


def _resumed_state(checkpoint_path: Path, config: Config, shape: tuple, state: dict,
                   total_steps: int) -> tuple[dict, int]:
    """The checkpoint's state, checked against a freshly initialised `state` (names, shapes,
    dtypes, device), and its step."""
    out = checkpoint_path.parent
    loaded, metadata = checkpoint.load(checkpoint_path, model=config.model)
    if tuple(metadata["shape"]) != tuple(shape):  # else conform's message would blame a layer's size
        raise ValueError(f"{out} was trained on data of shape {tuple(metadata['shape'])} but '{config.data}' "
                         f"has shape {tuple(shape)}: resume with the data it was trained on")
    state = checkpoint.conform(checkpoint_path, loaded, state)
    start_step = metadata["step"]
    if start_step >= total_steps:
        if config.lr_schedule != "constant":
            raise ValueError(f"{out} is already trained for {start_step} steps, the end of its "
                             f"{config.lr_schedule} learning-rate schedule: a longer run needs a new --out")
        raise ValueError(f"{out} is already trained for {start_step} steps: raise --epochs or --steps to "
                         "train further")
    return state, start_step


def _training_step(family: models.Family, config: Config, shape: tuple, state: dict, device: torch.device):
    """(step, state, layout): the family's step as the loop calls it, `step(state, batch, inputs) ->
    (state, metrics)`. Compiled, it is donated (the state updated in place) and on the CPU a state
    with convolutions goes channels-last, as must each image batch (`layout`)."""
    step_fn = family.make_step(config, shape)
    if config.precision == "bf16":
        step_fn = autocast_step(step_fn, device)  # evaluation and sampling stay float32
    if not config.compile:
        return step_fn, state, compilation.unchanged
    donating_step, state, layout = compilation.compile_for_training(step_fn, state, device, donate=True)

    def compiled_step(state, batch, inputs):  # the same (state, metrics) contract
        return state, donating_step(state, batch, inputs)
    return compiled_step, state, layout


def _diverged(checkpoint_path: Path, step: int, what: str) -> None:
    kept = (f"the checkpoint of step {checkpoint.read_metadata(checkpoint_path)['step']} is kept"
            if checkpoint_path.exists() else "no checkpoint was written")
    raise ValueError(f"training diverged: {what} became NaN or infinite by step {step}; {kept}: "
                     "start a new run with a lower --lr")


def _interrupted(out: Path, steps_done: int, total_steps: int, state_is_whole: bool) -> str:
    """What a Ctrl-C leaves: a whole state has been saved (at `steps_done`); a second Ctrl-C
    inside a step leaves a half-written state, so the checkpoint on disk is what is kept."""
    if not state_is_whole:
        if not (out / run_folder.CHECKPOINT).exists():
            return (f"interrupted inside step {steps_done + 1}, before the run's first checkpoint: nothing to "
                    f"resume; remove {out} and start again")
        return f"interrupted inside step {steps_done + 1}; the last checkpoint in {out} is kept: continue with --resume"
    if steps_done == total_steps:  # nothing is left to resume, only the run's closing files
        return (f"interrupted after the run's last step, {steps_done}; its checkpoint is saved in {out} but "
                f"samples.png, loss.png and summary.json are not: draw samples with `gen sample {out}`")
    return f"interrupted at step {steps_done}; checkpoint saved in {out}: continue with --resume"


# --- helpers ------------------------------------------------------------------------


class _InterruptAtStepBoundary:
    """Inside `with`: the first SIGINT (Ctrl-C) is held until `raise_if_requested()`, which the
    loop calls between steps; a second one raises KeyboardInterrupt at once. Outside the main
    thread (where Python delivers no signals) it does nothing, and so it does in a process
    started with SIGINT ignored (nohup, a script's background job `gen train ... &`): what
    its parent asked for stands."""

    def __init__(self):
        self.requested = False
        self.installed = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc_info):
        if self.installed:  # previous None: a handler set outside Python, which Python cannot put back
            signal.signal(signal.SIGINT, signal.SIG_DFL if self.previous is None else self.previous)
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def raise_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _batch(train_data: torch.Tensor, config: Config, per_step: int, epoch: int, index: int) -> torch.Tensor:
    """Batch `index` of `epoch`: (B, ...) or (batches_per_step, B, ...)."""
    size = config.batch_size * per_step
    batch = next(data.batches(train_data, size, config.seed, epoch, start=index))
    return batch.reshape(per_step, config.batch_size, *batch.shape[1:]) if per_step > 1 else batch


def _save_samples(family, state, config: Config, dataset: data.Dataset, path: Path) -> None:
    """Samples from fixed noise (seed, "samples"), so grids from different steps are comparable."""
    generator = rng.generator(config.seed, "samples")
    with checkpoint.replacing(path) as temporary:  # a crash leaves the old picture or the new, not half of one
        if dataset.kind == "image":
            images = family.generate(state, config, dataset.shape, 64, generator)
            plots.image_grid(images, temporary, scale=plots.upscale_for_viewing(max(dataset.shape[-2:])))
        else:
            points = family.generate(state, config, dataset.shape, config.eval_samples, generator)
            plots.scatter(points, temporary, reference=dataset.test[:config.eval_samples],
                          title=f"{config.model} on {config.data}")


def _status(row: dict) -> str:
    """The progress bar's text: the step's losses (VAE: loss; GAN: d_loss, g_loss) and throughput."""
    losses = "  ".join(f"{name} {value:.4g}" for name, value in row.items() if name.endswith("loss"))
    return f"{losses}  {row['samples_per_s']:.0f} samples/s"


def _progress(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not show)


def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]

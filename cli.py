"""gen's command line: train, sample, inspect and benchmark generative models.

Installed as the `gen` command; `python cli.py ...` is the same program.
Every expected failure (bad data, bad checkpoint, bad option) ends with one
line on stderr and exit status 1 (2 for a command line that does not parse),
never a traceback.
"""

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and benchmark VAEs and GANs written as pure functions.")


INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT (128 + 2): scripts tell it apart


def fail(message: str, status: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(status)


def one_line(error: Exception) -> str:
    """An expected error as its one line. gen's own errors already say what to do; an OSError
    straight from the system ("[Errno 36] File name too long: '...'") is given the file it is
    about and advice for the common causes."""
    import errno
    if not isinstance(error, OSError) or error.errno is None or error.filename is None:
        return str(error)
    too_long = ("a file or folder name may have at most 255 bytes"
                if any(len(os.fsencode(part)) > 255 for part in Path(error.filename).parts)
                else "a path may have at most 4,095 bytes")
    advice = {errno.ENAMETOOLONG: f"{too_long}: choose a shorter path",
              errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
              errno.EROFS: "write somewhere else", errno.ENOSPC: "free some space or write somewhere else",
              errno.EISDIR: "move that folder aside or choose another path",
              errno.ENOTDIR: "a part of the path is a file: choose another path"}
    return f"cannot use {error.filename}: {error.strerror}; {advice.get(error.errno, 'check the path')}"


def expected_errors() -> tuple[type[Exception], ...]:
    from gen.checkpoint import CheckpointError
    from gen.data import DataError
    return (ValueError, DataError, CheckpointError, OSError)


def default_data(model: str) -> str:
    """The embedded data set a model trains on without --data: 2-D points for the MLP GANs."""
    return "grid25" if model in ("gan", "wgan-gp", "sngan") else "digits"


def absolute_directory(data: str) -> str:
    """--data as the run keeps it: a directory of IDX files as an absolute path (so a resume from
    another working directory finds it), a data set's name as it is."""
    from gen.data import NAMED_SETS
    return str(Path(data).resolve()) if data not in NAMED_SETS and Path(data).is_dir() else data


def run_folder(model: str, data: str) -> Path:
    """runs/MODEL-DATA: where a run goes, and where --resume looks, without --out."""
    return Path("runs") / f"{model}-{Path(data).name or 'data'}"


def default_out(model: str, data: str) -> Path:
    """run_folder, or -2, -3, ... when that is taken: a new run never overwrites an old one."""
    base = run_folder(model, data)
    candidate, suffix = base, 2
    while candidate.exists():
        candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return candidate


# `gen train` options that define what a run trains: given with --resume they are refused, since
# the checkpoint's own settings are the ones the run continues with.
RUN_SETTINGS = ("batch_size", "lr", "optimizer", "weight_decay", "beta", "iwae_k", "latent_dim", "lr_schedule",
                "hidden_dim", "gan_loss", "n_critic", "gp_weight", "pack", "ema_decay", "seed", "precision")


# `gen train` options that only some models read: given to another model they would be recorded in
# its config and change nothing, so they are refused.
VAES, GANS = ("vae", "conv-vae"), ("gan", "dcgan", "wgan-gp", "sngan")
MODEL_OPTIONS = {"beta": VAES, "iwae_k": VAES, "gan_loss": GANS, "n_critic": GANS, "ema_decay": GANS,
                 "gp_weight": ("wgan-gp",), "pack": ("gan", "sngan"),
                 "hidden_dim": ("vae", "conv-vae", "gan", "wgan-gp", "sngan")}  # dcgan's widths are fixed
IDX_SETS = ("fashion-mnist", "mnist")  # the named sets found through --data-dir


@app.command()
def train(
    context: typer.Context,
    model: Annotated[str, typer.Argument(help="vae | conv-vae | gan | dcgan | wgan-gp | sngan")],
    data: Annotated[str, typer.Option(help="digits | fashion-mnist | mnist | ring8 | grid25 | moons | "
                                           "swissroll | a directory of IDX files")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="where MNIST/Fashion-MNIST IDX files are")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="passes over the training set")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (instead of --epochs)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate")] = None,
    optimizer: Annotated[str, typer.Option(help="adam | adamw | sgd")] = "adam",
    weight_decay: Annotated[Optional[float], typer.Option(help="adamw: decoupled weight decay (default 0.01)")] = None,
    beta: Annotated[float, typer.Option(help="β-VAE weight on the KL term")] = 1.0,
    iwae_k: Annotated[int, typer.Option(help="importance samples for the IWAE bound (1: ELBO)")] = 1,
    latent_dim: Annotated[Optional[int], typer.Option(help="size of z")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="constant | linear | cosine (decaying toward 0 "
                                                            "over the run)")] = None,
    hidden_dim: Annotated[Optional[int], typer.Option(help="width of the hidden layers (vae, conv-vae, and "
                                                                "the MLP networks of the GANs)")] = None,
    gan_loss: Annotated[Optional[str], typer.Option(help="GAN: minimax | non-saturating | wasserstein | "
                                                        "hinge")] = None,
    n_critic: Annotated[Optional[int], typer.Option(help="GAN: discriminator updates per generator update "
                                                        "(WGAN-GP's default 5, the others' 1)")] = None,
    gp_weight: Annotated[float, typer.Option(help="WGAN-GP: gradient penalty weight λ")] = 10.0,
    pack: Annotated[Optional[int], typer.Option(help="PacGAN: samples the discriminator judges jointly")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="GAN: decay of the generator's weight average, "
                                                            "used for sampling (0: off)")] = None,
    seed: Annotated[int, typer.Option(help="seed for init, data order and noise")] = 0,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the step")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="float32 | bf16 (matmuls and convolutions in bfloat16: "
                                                "faster where the CPU or GPU has bf16 units)")] = "float32",
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/MODEL-DATA)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint, with its settings (only length, "
                                     "device, compile, data location and logging may change)")] = False,
    log_every: Annotated[int, typer.Option(help="steps between metric lines")] = 50,
    sample_every: Annotated[int, typer.Option(help="steps between fixed-noise sample grids (0: off)")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Train MODEL and write a run folder: checkpoint, config, metrics, samples.png, loss.png."""
    arguments = dict(locals())  # the options as given, for --resume's check
    from dataclasses import replace

    from gen import checkpoint, data as datasets, models
    from gen.config import Config
    from gen.run_folder import CHECKPOINT
    from gen.train import train as run_training

    # The options typed on the command line. (The source is compared by name: typer 0.29 carries
    # its own copy of click's ParameterSource enum.)
    given = {name: value for name, value in arguments.items()
             if getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"}
    if data_dir:  # kept absolute, as a --data directory is: a resume from elsewhere finds the same files
        data_dir = str(Path(data_dir).resolve())
    try:
        models.get(model)  # an unknown name first: the option checks below would blame an option
        if resume:
            out = out or run_folder(model, absolute_directory(data or default_data(model)))
            if out.name == CHECKPOINT and out.is_file():
                out = out.parent  # the run's checkpoint named instead of its folder, as sample and info take
            metadata = checkpoint.read_metadata(out / CHECKPOINT)
            if metadata["model"] != model:
                fail(f"{out} holds a '{metadata['model']}' run, not '{model}': resume it as {metadata['model']}")
            config = Config.from_dict(metadata["config"])
            # What the run trains (data, model, optimizer, precision, seed, ...) is fixed by its
            # checkpoint; a resume may change only how long and where it runs, and how it reports.
            # An option given with the run's own value changes nothing and passes.
            changed = [name for name in RUN_SETTINGS if name in given and given[name] != getattr(config, name)]
            if changed:
                name = changed[0]
                fail(f"--{name.replace('_', '-')} cannot change when resuming: the run has "
                     f"{getattr(config, name)}; leave it out, or start a new run with --out elsewhere")
            named_sets = datasets.NAMED_SETS
            if data is not None and data != config.data and (data in named_sets or config.data in named_sets):
                fail(f"{out} holds a run on '{config.data}', not '{data}': resume it with --data {config.data} "
                     f"or without --data")
            if data is None and config.data not in named_sets and not Path(config.data).is_dir():
                fail(f"the run's data directory '{config.data}' no longer exists: give its new place as --data")
            # A new length replaces the old one, in its own unit (0 is refused by validation, not dropped).
            length = {"epochs": epochs, "steps": steps} if (epochs is not None or steps is not None) else {}
            # The data files may have moved: a new --data-dir, or a run's IDX directory given anew.
            moved = {**({"data_dir": data_dir} if data_dir is not None else {}),
                     **({"data": absolute_directory(data)} if data is not None else {})}
            # How it runs and reports stays the run's own too, unless given again (it was reset to
            # the defaults: a run logging every step went back to every 50th).
            how = {name: given[name] for name in ("compile", "device", "log_every", "sample_every") if name in given}
            config = replace(config, **how, **length, **moved)
        else:
            data = absolute_directory(data or default_data(model))
            config = Config(model=model, data=data, data_dir=data_dir, epochs=epochs, steps=steps,
                            batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, lr=lr,
                            seed=seed, beta=beta, iwae_k=iwae_k, latent_dim=latent_dim, hidden_dim=hidden_dim,
                            lr_schedule=lr_schedule,
                            gan_loss=gan_loss, n_critic=n_critic, gp_weight=gp_weight, pack=pack,
                            ema_decay=ema_decay, compile=compile, device=device, precision=precision,
                            log_every=log_every, sample_every=sample_every)
            out = out or default_out(model, data)
        for name, readers in MODEL_OPTIONS.items():  # a resume may restate the run's own value
            if name in given and model not in readers and not (resume and given[name] == getattr(config, name)):
                fail(f"--{name.replace('_', '-')} does not apply to {model} (only to {', '.join(readers)}): "
                     "leave it out")
        # The checks that depend on the data only for data that exists: a misspelt --data is
        # data.load's to name, not a reason to drop --data-dir.
        known_data = config.data in datasets.NAMED_SETS or Path(config.data).is_dir()
        if ("hidden_dim" in given and not models.get(model).hidden_dim_on_images and known_data
                and datasets.kind_of(config.data) == "image" and not (resume and hidden_dim == config.hidden_dim)):
            fail(f"--hidden-dim does not apply to {model} on images (DCGAN's convolutional networks, of fixed "
                 "widths): leave it out")
        if "data_dir" in given and known_data and config.data not in IDX_SETS:
            fail(f"--data-dir is where {' and '.join(IDX_SETS)} are looked for; '{config.data}' does not use it: "
                 "leave it out")
        summary = run_training(config, out, resume=resume, show_progress=progress)
    except KeyboardInterrupt as interrupt:
        fail(str(interrupt) or "interrupted", INTERRUPTED)
    except expected_errors() as error:
        fail(one_line(error))
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        fail("out of memory for this model and batch (checkpoints already written are kept): "
             "start a run with a smaller --batch-size, --hidden-dim, --latent-dim or --iwae-k")
    final = {k: round(v, 4) for k, v in summary["final"].items() if isinstance(v, float)}
    evaluation = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary["evaluation"].items()
                  if k not in ("step", "epoch")}
    typer.echo(f"trained {summary['steps']} steps on {summary['device']} "
               f"({'compiled, ' + str(summary['graphs_compiled']) + ' graph(s)' if summary['compiled'] else 'eager'})")
    typer.echo(f"final: {final}")
    if evaluation:
        typer.echo(f"evaluation: {evaluation}")
    typer.echo(f"run folder: {summary['out']}")


@app.command()
def sample(
    source: Annotated[Path, typer.Argument(help="a run folder or a checkpoint file")],
    n: Annotated[int, typer.Option(help="number of samples")] = 64,
    out: Annotated[Path, typer.Option(help="FILE.png for a picture, FILE.safetensors for raw samples")] =
        Path("samples.png"),
    seed: Annotated[int, typer.Option(help="seed for the latent noise")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """Draw N samples from a trained model."""
    try:
        write_samples(source, n, out, seed, device)
    except KeyboardInterrupt:  # before expected_errors(), which imports gen (see info)
        fail("interrupted; --out is left as it was", INTERRUPTED)
    except expected_errors() as error:
        fail(one_line(error))
    typer.echo(f"wrote {n} samples to {out}")


def write_samples(source: Path, n: int, out: Path, seed: int, device: str) -> None:
    from safetensors.torch import save_file

    import gen.device
    from gen import checkpoint, data, models, plots, rng
    from gen.config import Config, validate
    from gen.device import resolve_device
    from gen.tree import to_device

    if n < 1:
        raise ValueError("--n must be at least 1")
    if out.suffix not in (".png", ".safetensors"):  # ".png" alone is a hidden file's name, not a suffix
        raise ValueError(f"cannot write '{out.name}': --out must be a file name ending in .png or .safetensors")
    path = checkpoint.path_of(source)
    # Not a directory, device or checkpoint (the source itself, or another run's state): checked
    # before the sampling work.
    target = checkpoint.refuse_to_replace(out, "--out", "the samples")
    if target.suffix != out.suffix:  # a link named x.png to metrics.jsonl would turn the log into a picture
        raise ValueError(f"--out {out} links to {target}, which is not a {out.suffix} file: give another file name")
    loaded, metadata = checkpoint.load(path)
    family = models.get(metadata["model"])
    config = Config.from_dict(metadata["config"])
    shape, kind = tuple(metadata["shape"]), metadata["data_kind"]
    damaged = f"{path}'s metadata is damaged (" + "{}): use another checkpoint"
    try:
        validate(config)  # what `train --resume` checks too: a size of -5 or 0 breaks the model's init
    except ValueError as error:
        raise ValueError(damaged.format(f"its config: {error}")) from None
    if config.model != metadata["model"]:
        raise ValueError(damaged.format(f"model '{metadata['model']}' but a '{config.model}' config"))
    if kind not in family.data_kinds or data.kind_of(config.data) != kind:
        raise ValueError(damaged.format(f"a {metadata['model']} model trained on '{config.data}' cannot make {kind}"))
    target = resolve_device(device)
    try:
        template = to_device(family.init(config, shape, config.seed), target)
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        raise ValueError(f"not enough memory to build the model of {path}: sample it on a bigger machine") from None
    state = checkpoint.conform(path, loaded, template)
    too_many = f"not enough memory for {n:,} samples at once: ask for fewer with --n"
    too_big_a_picture = (f"not enough memory for a picture of {n:,} samples: ask for fewer with --n, or write "
                         "them to FILE.safetensors")
    picture = out.suffix == ".png" and kind == "image"
    scale = plots.upscale_for_viewing(max(shape[-2:])) if kind == "image" else 1  # 8x for 8x8 digits
    samples_bytes = n * math.prod(shape) * 4  # float32
    memory = gen.device.physical_memory_bytes()
    if samples_bytes > memory:
        raise ValueError(too_many)
    if picture and samples_bytes + plots.image_grid_bytes(n, *shape, scale=scale) > memory:
        raise ValueError(too_big_a_picture)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the folder of --out {out} ({error.strerror}): choose another --out") from None
    try:
        samples = family.generate(state, config, shape, n, rng.generator(seed, "sample")).cpu()
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        raise ValueError(too_many) from None
    try:
        with checkpoint.replacing(out) as temporary:  # a write that fails leaves nothing behind
            if out.suffix == ".safetensors":
                save_file({"samples": samples.contiguous()}, temporary,
                          metadata={"model": metadata["model"], "step": str(metadata["step"])})
            elif kind == "image":
                plots.image_grid(samples, temporary, scale=scale)
            else:
                reference = data.load(config.data, config.data_dir, config.seed).test[:n]
                plots.scatter(samples, temporary, reference=reference,
                              title=f"{config.model}, step {metadata['step']}")
            try:  # a run may have saved there while we sampled: keep its checkpoint
                checkpoint.refuse_to_replace(out, "--out", "the samples")
            except (ValueError, OSError) as error:  # an OSError would be blamed on the write
                raise ValueError(f"while sampling, {error}") from None
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        raise ValueError(too_big_a_picture if picture else too_many) from None


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocator running out of memory: CUDA's OutOfMemoryError, Python's
    MemoryError, or another allocator's RuntimeError (the CPU's "DefaultCPUAllocator: can't
    allocate memory", or "not enough memory" on Windows; MPS's "out of memory")."""
    import torch
    message = str(error)
    # "Storage size calculation overflowed": sizes whose product passes int64, more than any memory.
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        words in message for words in ("can't allocate memory", "not enough memory", "out of memory",
                                       "Storage size calculation overflowed"))


@app.command()
def info(source: Annotated[Path, typer.Argument(help="a run folder or a checkpoint file")]) -> None:
    """Print a checkpoint's model, data, step, parameter count and config."""
    try:
        from gen import checkpoint
        from gen.tree import leaves
        path = checkpoint.path_of(source)
        state, metadata = checkpoint.load(path)
    # First: evaluating expected_errors() imports gen, which a Ctrl-C inside torch's import left half-made.
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)
    except expected_errors() as error:
        fail(one_line(error))
    params = state.get("params", {})
    if not isinstance(params, dict):  # a lone tensor named "params": not a training state's tree
        fail(f"{path} holds no parameter tree (its 'params' is one tensor): it is not a gen training checkpoint")
    count = sum(tensor.numel() for tensor in leaves(params))
    config = metadata["config"]
    typer.echo(f"model:      {metadata['model']}")
    typer.echo(f"data:       {config.get('data')} {tuple(metadata.get('shape', ()))}")
    typer.echo(f"step:       {metadata.get('step')} (epoch {metadata.get('epoch', math.nan):.2f})")
    typer.echo(f"parameters: {count:,}")
    typer.echo(f"versions:   gen {metadata.get('gen_version')}, torch {metadata.get('torch_version')}")
    typer.echo("config:     " + ", ".join(f"{k}={v}" for k, v in config.items()))


@app.command()
def bench(
    models: Annotated[Optional[list[str]], typer.Argument(help="vae conv-vae dcgan gan-2d wgan-gp (default all); "
                                                              "MODEL:B1,B2 gives that model its own batch sizes")]
        = None,
    batch_size: Annotated[Optional[list[int]], typer.Option(help="batch sizes (repeatable)")] = None,
    steps: Annotated[int, typer.Option(help="timed steps per repeat")] = 20,
    repeats: Annotated[int, typer.Option(help="repeats per mode (median reported)")] = 5,
    mode: Annotated[Optional[list[str]], typer.Option(help="compiled | undonated | eager | module | vmap-N | "
                                                           "compiled-bf16 | compiled-ro (CUDA) (repeatable)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    json: Annotated[Optional[str], typer.Option(help="also write the results as JSON")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="seconds after which nothing new starts")] = None,
    compile_times: Annotated[bool, typer.Option("--compile-times/--no-compile-times",
                                                help="measure cold and warm compiles in fresh processes")] = True,
) -> None:
    """Time the training step of each model: compiled (as gen train runs it), undonated, eager and the nn.Module peer."""
    from gen import bench as harness

    try:
        harness.main(models=models, batch_sizes=batch_size, steps=steps, repeats=repeats, device=device,
                     json_path=json, modes=mode, measure_compile=compile_times, time_budget=time_budget)
    except KeyboardInterrupt:  # the harness has printed what it kept and written its JSON
        raise typer.Exit(INTERRUPTED) from None
    except expected_errors() as error:
        fail(one_line(error))


def main() -> None:
    from gen import mkl_amd
    mkl_amd.load()  # before anything imports torch; on AMD CPUs MKL's faster kernels, elsewhere nothing
    try:
        # typer.Exit's code is returned; parse errors are raised to here
        status = app(prog_name="gen", standalone_mode=False)
    except typer.TyperException as error:  # typer's click: an unknown command or option, a non-number, ...
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError":  # plain `gen`: its help on stdout, as before
            help_text = error.format_message()  # typer's rich help prints itself and returns ""
            if help_text:
                typer.echo(help_text)
        else:  # one line, like every other error, instead of click's boxed usage message
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            typer.echo(f"error: {error.format_message()}{hint}", err=True)
        status = error.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    sys.exit(main())

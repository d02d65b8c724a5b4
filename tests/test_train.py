"""The training loop: compiled once and equal to eager, exact resume, interruption, run folder."""

import json
import math
import signal
import sys
import threading
import time

import pytest
import torch

from gen import checkpoint, compilation, rng, run_folder, train as training, vae
from gen.config import Config
from gen.tree import leaves


@pytest.fixture(autouse=True)
def sigint_as_python_sets_it():
    """Every test here starts with Python's own SIGINT handler, whatever pytest was started with (a
    script's background job starts with SIGINT ignored, which gen train leaves as it is), and the
    handler it had is put back after it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["vae", "conv-vae"])
def test_compiled_step_builds_one_graph_and_matches_eager(tmp_path, model, monkeypatch):
    """Compilation is what this test is about, so it compiles (about 15-25 s each on 2 cores).
    The conv VAE's compiled step gets its state and batches channels-last (gen.compilation,
    convolution_layout), is checkpointed from that state and resumes compiled."""
    layouts = []  # per call: is the state's convolution weights' layout channels-last?
    dynamo_calls = []  # calls that went through Dynamo rather than straight to the graph
    compile_step = compilation.compile_step

    def spied_compile_step(step, device, **options):
        compiled = compile_step(step, device, **options)
        through_dynamo = compiled.compiled

        def counted(*args):
            dynamo_calls.append(len(layouts))
            return through_dynamo(*args)
        compiled.compiled = counted

        def call(state, batch, inputs):
            # (a weight with one input channel is the same either way; the others tell)
            weights = [t for t in leaves(state) if t.ndim == 4]
            layouts.append(all(t.is_contiguous(memory_format=torch.channels_last) for t in weights)
                           and any(not t.is_contiguous() for t in weights))
            return compiled(state, batch, inputs)
        return call
    monkeypatch.setattr(compilation, "compile_step", spied_compile_step)

    torch._dynamo.reset()
    config = Config(model=model, epochs=3, log_every=5, sample_every=10)
    compiled = training.train(config, tmp_path / "compiled", show_progress=False)
    eager = training.train(Config(**{**config.to_dict(), "compile": False}), tmp_path / "eager", show_progress=False)
    # 33 steps, 3 evaluations and 3 sample grids in between: still one graph.
    assert compiled["graphs_compiled"] == 1 and eager["graphs_compiled"] == 0
    assert compiled["compile_seconds"] > 0  # the first call's time, kept apart from the throughput
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["compile_seconds"] == \
        compiled["compile_seconds"]
    compiled_rows, eager_rows = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert [r["step"] for r in compiled_rows] == [r["step"] for r in eager_rows]
    for a, b in zip(compiled_rows, eager_rows):
        for name in ("loss", "reconstruction", "kl", "test_loss"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-3), (a["step"], name)
    assert layouts == [model == "conv-vae"] * 33
    assert dynamo_calls == [1]  # the compiling call; the other 32 called the graph directly

    # Resumed and compiled again from the checkpoint the (channels-last) state was saved to.
    resumed = training.train(Config(**{**config.to_dict(), "epochs": 4}), tmp_path / "compiled", resume=True,
                             show_progress=False)
    assert resumed["steps"] == 44 and layouts == [model == "conv-vae"] * 44 and dynamo_calls == [1, 34]
    assert checkpoint.load(tmp_path / "compiled" / run_folder.CHECKPOINT)[1]["step"] == 44


def test_bf16_precision_runs_the_step_under_autocast_and_keeps_the_state_float32(tmp_path):
    config = Config(model="vae", steps=20, log_every=5, compile=False)
    full = training.train(config, tmp_path / "float32", show_progress=False)
    half = training.train(Config(**{**config.to_dict(), "precision": "bf16"}), tmp_path / "bf16", show_progress=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    state, metadata = checkpoint.load(tmp_path / "bf16" / run_folder.CHECKPOINT)
    assert metadata["config"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in state["params"].values())
    assert all(t.dtype == torch.float32 for t in state["opt_state"]["mu"].values())
    # bfloat16 matmuls change the numbers a little, not the training: same losses to a few percent
    assert half["final"]["loss"] != full["final"]["loss"]
    assert half["final"]["loss"] == pytest.approx(full["final"]["loss"], rel=0.05)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = Config(model="vae", steps=30, log_every=5, compile=False)
    training.train(config, tmp_path / "straight", show_progress=False)
    half = Config(**{**config.to_dict(), "steps": 15})
    training.train(half, tmp_path / "resumed", show_progress=False)
    training.train(config, tmp_path / "resumed", resume=True, show_progress=False)
    straight, _ = checkpoint.load(tmp_path / "straight" / run_folder.CHECKPOINT)
    resumed, metadata = checkpoint.load(tmp_path / "resumed" / run_folder.CHECKPOINT)
    assert metadata["step"] == 30
    for name, tensor in straight["params"].items():
        assert torch.equal(tensor, resumed["params"][name]), name
    assert torch.equal(straight["opt_state"]["count"], resumed["opt_state"]["count"])
    losses = lambda r: [(x["step"], x["loss"]) for x in r if "loss" in x]  # noqa: E731
    assert losses(rows(tmp_path / "straight")) == losses(rows(tmp_path / "resumed"))


def test_a_process_first_step_logs_evaluates_and_saves_when_due(tmp_path):
    """The first step of a process (which compiles, when compiled) is still a step: a 1-step run,
    and a resume by one step, each end with that step's metrics row and checkpoint."""
    config = Config(model="vae", steps=1, log_every=5, compile=False)
    training.train(config, tmp_path, show_progress=False)
    assert checkpoint.load(tmp_path / run_folder.CHECKPOINT)[1]["step"] == 1
    assert [row["step"] for row in rows(tmp_path)] == [1, 1]  # its training row, then its evaluation
    assert rows(tmp_path)[0]["samples_per_s"] > 0
    training.train(Config(**{**config.to_dict(), "steps": 2}), tmp_path, resume=True, show_progress=False)
    assert checkpoint.load(tmp_path / run_folder.CHECKPOINT)[1]["step"] == 2
    assert [row["step"] for row in rows(tmp_path)] == [1, 1, 2, 2]


def test_resume_drops_log_lines_gen_could_not_have_written(tmp_path):
    """Hand-edited or foreign lines in metrics.jsonl: the resume keeps gen's rows, drops the rest."""
    config = Config(model="vae", steps=10, log_every=5, compile=False)
    training.train(Config(**{**config.to_dict(), "steps": 5}), tmp_path, show_progress=False)
    kept = (tmp_path / "metrics.jsonl").read_bytes()
    junk = [b"5", b"[1, 2]", b'{"step": "3"}', b'{"step": null}', b'{"step": true}', b'{"step": 2, "loss": "x"}',
            b'{"loss": 1.0}', b"\xff\xfe not utf-8", b'{"step": 4, "loss": 1.5',
            b'{"step": 5, "modes_captured": 0, "reverse_kl": Infinity}',  # an older gen's undefined KL
            b'{"step": 1, "loss": 1' + b"0" * 400 + b'}',  # an integer no float holds: matplotlib's OverflowError
            b'{"step": -' + b"9" * 30 + b', "loss": 1.0}', b'{"step": 0, "loss": 1.0}',
            b"[" * 100_000 + b"]" * 100_000,  # too deep for json: RecursionError
            b'{"step": 7, "loss": 1.0}']  # a well-formed row past the checkpoint's step: a crash logged it
    (tmp_path / "metrics.jsonl").write_bytes(kept + b"\n".join(junk) + b"\n")
    training.train(config, tmp_path, resume=True, show_progress=False)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    logged = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").open()]
    assert {"step": 5, "modes_captured": 0} in logged  # kept, without the non-finite field
    assert (tmp_path / "metrics.jsonl").read_bytes().startswith(kept)
    assert [row["step"] for row in logged if "loss" in row] == [5, 10]
    assert all(isinstance(row["step"], int) for row in logged)


def signalling_step(monkeypatch, at_call: int, signals: int):
    """The VAE's step, but its call number `at_call` sends itself `signals` SIGINTs (Ctrl-C) midway,
    before doing the step's work: a Ctrl-C that lands inside a step."""
    make_step = vae.MLP_VAE.make_step

    def make_signalling_step(config, shape):
        step, calls = make_step(config, shape), []

        def signalling(state, batch, inputs):
            calls.append(None)
            if len(calls) == at_call:
                for _ in range(signals):
                    # To the main thread itself: a signal sent to the process may land on one of
                    # torch's threads, and two that land before Python's handler runs count as one.
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return step(state, batch, inputs)
        return signalling
    monkeypatch.setattr(vae, "MLP_VAE", vae.MLP_VAE._replace(make_step=make_signalling_step))


def test_ctrl_c_inside_a_step_takes_effect_after_it(tmp_path, monkeypatch):
    config = Config(model="vae", steps=12, compile=False)
    training.train(Config(**{**config.to_dict(), "steps": 5}), tmp_path / "straight", show_progress=False)
    signalling_step(monkeypatch, at_call=5, signals=1)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 5"):
        training.train(config, tmp_path / "interrupted", show_progress=False)
    straight, _ = checkpoint.load(tmp_path / "straight" / run_folder.CHECKPOINT)
    interrupted, metadata = checkpoint.load(tmp_path / "interrupted" / run_folder.CHECKPOINT)
    assert metadata["step"] == 5  # the step under way finished, and is what was saved
    for name, tensor in straight["params"].items():
        assert torch.equal(tensor, interrupted["params"][name]), name


def test_ctrl_c_inside_the_last_step_stops_the_run_too(tmp_path, monkeypatch):
    """A Ctrl-C held through the run's last step is acted on after it: the last step's checkpoint
    is kept, written once, and the command ends as interrupted instead of going on to finish."""
    saves = []
    save = checkpoint.save
    monkeypatch.setattr(training.checkpoint, "save", lambda *args: saves.append(args[2]["step"]) or save(*args))
    signalling_step(monkeypatch, at_call=5, signals=1)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted after the run's last step, 5; its checkpoint is "
                                                r"saved in .* draw samples with `gen sample "):
        training.train(Config(model="vae", steps=5, compile=False), tmp_path, show_progress=False)
    assert saves == [5]  # written once, not again on the way out
    assert checkpoint.read_metadata(tmp_path / run_folder.CHECKPOINT)["step"] == 5
    assert not (tmp_path / "summary.json").exists()


def test_second_ctrl_c_inside_a_step_stops_at_once_and_writes_no_checkpoint(tmp_path, monkeypatch):
    signalling_step(monkeypatch, at_call=5, signals=2)
    with pytest.raises(KeyboardInterrupt, match="interrupted inside step 5, before the run's first checkpoint: "
                                                "nothing to resume; remove .* and start again"):
        training.train(Config(model="vae", steps=12, compile=False), tmp_path, show_progress=False)
    assert not (tmp_path / run_folder.CHECKPOINT).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_run_started_with_ctrl_c_ignored_leaves_it_ignored(tmp_path, monkeypatch):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, or `gen train ... &` in a script
    signalling_step(monkeypatch, at_call=3, signals=2)
    summary = training.train(Config(model="vae", steps=5, compile=False), tmp_path, show_progress=False)
    assert summary["steps"] == 5 and checkpoint.read_metadata(tmp_path / run_folder.CHECKPOINT)["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_second_ctrl_c_after_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    config = Config(model="vae", steps=4, compile=False)
    training.train(config, tmp_path, show_progress=False)
    before = (tmp_path / run_folder.CHECKPOINT).read_bytes()
    signalling_step(monkeypatch, at_call=2, signals=2)
    with pytest.raises(KeyboardInterrupt, match="interrupted inside step 6; the last checkpoint .* is kept: "
                                                "continue with --resume"):
        training.train(Config(**{**config.to_dict(), "steps": 12}), tmp_path, resume=True, show_progress=False)
    assert (tmp_path / run_folder.CHECKPOINT).read_bytes() == before


def test_interrupt_saves_a_valid_resume_point(tmp_path, monkeypatch):
    original = rng.generator

    def interrupt_at_step_7(seed, *path, **kwargs):
        if path == ("noise", 7):
            raise KeyboardInterrupt
        return original(seed, *path, **kwargs)

    monkeypatch.setattr(training.rng, "generator", interrupt_at_step_7)
    config = Config(model="vae", steps=20, compile=False)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 7"):
        training.train(config, tmp_path, show_progress=False)
    assert checkpoint.read_metadata(tmp_path / run_folder.CHECKPOINT)["step"] == 7
    monkeypatch.setattr(training.rng, "generator", original)
    summary = training.train(config, tmp_path, resume=True, show_progress=False)
    assert summary["final"]["step"] == 20


def all_params_nan(state):
    return {**state, "params": {k: torch.full_like(v, math.nan) for k, v in state["params"].items()}}


def one_value(state, part, value):
    """The state with one number of the last tensor of state[part] (params, or an Adam moment) set."""
    tree = state[part] if part == "params" else state["opt_state"][part]
    name = list(tree)[-1]
    poisoned = tree[name].clone()
    poisoned.view(-1)[-1] = value
    tree = {**tree, name: poisoned}
    return {**state, "params": tree} if part == "params" else \
        {**state, "opt_state": {**state["opt_state"], part: tree}}


@pytest.mark.parametrize("poison", [all_params_nan, lambda state: one_value(state, "params", math.nan),
                                    lambda state: one_value(state, "mu", math.inf)],
                         ids=["every parameter NaN", "one NaN in the last parameter", "one inf in Adam's mu"])
def test_a_diverged_run_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, poison):
    """The 22nd call, the last of epoch 2, writes NaN or inf into the state; its logged loss, computed
    before the update, is finite, so the check before saving is what refuses: step 11's is kept."""
    make_step = vae.MLP_VAE.make_step

    def make_poisoning_step(config, shape):
        step, calls = make_step(config, shape), {"made": 0}

        def poisoning(state, batch, inputs):
            calls["made"] += 1
            state, metrics = step(state, batch, inputs)
            if calls["made"] == 22:
                state = poison(state)
            return state, metrics
        return poisoning
    monkeypatch.setattr(vae, "MLP_VAE", vae.MLP_VAE._replace(make_step=make_poisoning_step))
    config = Config(model="vae", epochs=2, log_every=100, compile=False)
    with pytest.raises(ValueError, match="training diverged: the model's state became NaN or infinite by step 22; "
                                         "the checkpoint of step 11 is kept") as error:
        training.train(config, tmp_path, show_progress=False)
    assert "\n" not in str(error.value)
    state, metadata = checkpoint.load(tmp_path / run_folder.CHECKPOINT)
    assert metadata["step"] == 11 and all(torch.isfinite(t).all() for t in leaves(state))


def test_run_folder_holds_everything_a_run_promises(tmp_path, monkeypatch):
    plotted, loss_curves = [], training.plots.loss_curves
    monkeypatch.setattr(training.plots, "loss_curves",
                        lambda history, *args, **kwargs: plotted.append(history) or loss_curves(history, *args, **kwargs))
    summary = training.train(Config(model="conv-vae", epochs=2, log_every=4, compile=False), tmp_path,
                             show_progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.safetensors", "config.json", "metrics.jsonl", "samples.png", "loss.png", "summary.json"} <= names
    assert json.loads((tmp_path / "summary.json").read_text())["evaluation"] == summary["evaluation"]
    assert summary["evaluation"]["step"] == 22 and summary["final"]["step"] == 22  # the last of each kind
    # the loss curves are the training rows' (evaluation rows have no samples_per_s), every one of them
    assert plotted == [[r for r in rows(tmp_path) if "samples_per_s" in r]] and len(plotted[0]) == 7
    logged = rows(tmp_path)
    assert all({"step", "epoch", "loss", "samples_per_s"} <= set(r) for r in logged if "loss" in r)
    assert [r["step"] for r in logged if "test_loss" in r] == [11, 22]  # one evaluation per epoch
    assert json.loads((tmp_path / "config.json").read_text())["hidden_dim"] == 256  # family default resolved
    assert summary["evaluation"]["test_loss"] < logged[0]["loss"]
    from PIL import Image
    assert Image.open(tmp_path / "samples.png").size == ((8 * 9 - 1) * 8, (8 * 9 - 1) * 8)  # 8x8 grid, 8x upscaled


@pytest.mark.parametrize("data, hidden_dim", [("digits", None), ("ring8", 128)])
def test_a_gan_on_images_records_no_hidden_width(tmp_path, data, hidden_dim):
    # On images WGAN-GP's networks are DCGAN's, of fixed widths: the toy MLPs' default width would
    # be a setting the run does not have, in its config.json and in its checkpoint.
    training.train(Config(model="wgan-gp", data=data, steps=1, batch_size=8, n_critic=1, compile=False), tmp_path,
                   show_progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_dim"] == hidden_dim
    assert checkpoint.read_metadata(tmp_path / "checkpoint.safetensors")["config"]["hidden_dim"] == hidden_dim


def test_a_picture_that_fails_halfway_leaves_the_old_one(tmp_path, monkeypatch):
    config = Config(model="vae", steps=2, log_every=1, compile=False)
    training.train(config, tmp_path, show_progress=False)
    before = (tmp_path / "samples.png").read_bytes()

    def fail_halfway(images, path, scale):
        open(path, "wb").write(before[:100])
        raise RuntimeError("the disk went away")
    monkeypatch.setattr(training.plots, "image_grid", fail_halfway)
    with pytest.raises(RuntimeError, match="the disk went away"):
        training.train(Config(**{**config.to_dict(), "steps": 3}), tmp_path, resume=True, show_progress=False)
    assert (tmp_path / "samples.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".samples")) == []


def test_the_seed_sets_the_initial_state_the_data_order_and_the_noise(tmp_path):
    """The first logged loss is the step computed by hand from what the seed derives (README:
    init from the seed, data order from (seed, epoch), noise from (seed, step))."""
    from gen import data, models
    config = Config(model="vae", seed=3, steps=1, log_every=1, compile=False)
    training.train(config, tmp_path, show_progress=False)
    config, family, dataset = training.prepare(config)
    state = family.init(config, dataset.shape, 3)
    batch = next(data.batches(dataset.train, config.batch_size, 3, 0))
    inputs = family.make_noise(config, dataset.shape, config.batch_size, rng.generator(3, "noise", 0))
    _, metrics = family.make_step(config, dataset.shape)(state, batch, inputs)
    assert rows(tmp_path)[0]["loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)


def test_sample_grids_of_different_steps_share_their_noise(tmp_path):
    # With an lr too small to move a float32 weight, the model is the same at every step, and so
    # is every grid drawn from the fixed (seed, "samples") noise.
    training.train(Config(model="vae", steps=2, sample_every=1, lr=1e-30, compile=False), tmp_path,
                   show_progress=False)
    grids = [(tmp_path / "samples" / f"step_{step:07d}.png").read_bytes() for step in (1, 2)]
    assert grids[0] == grids[1] == (tmp_path / "samples.png").read_bytes()


def test_a_resume_cannot_lengthen_a_decaying_schedule(tmp_path):
    """Past decay_steps the linear and cosine schedules give lr 0, so extra steps would do nothing."""
    config = Config(model="vae", steps=4, lr_schedule="linear", compile=False)
    training.train(config, tmp_path, show_progress=False)
    before = (tmp_path / run_folder.CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="linear learning-rate schedule reaches 0 at step 4, and this run asks "
                                         "for 8 steps: a resume cannot lengthen a decaying run"):
        training.train(Config(**{**config.to_dict(), "steps": 8, "decay_steps": 4}), tmp_path, resume=True,
                       show_progress=False)
    assert (tmp_path / run_folder.CHECKPOINT).read_bytes() == before


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path):
    config = Config(model="vae", steps=2, compile=False)
    training.train(config, tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        training.train(config, tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="already trained for 2 steps"):
        training.train(config, tmp_path, resume=True, show_progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        training.train(config, tmp_path / "other", resume=True, show_progress=False)


def test_a_log_that_is_not_a_file_stops_a_resume_with_one_line(tmp_path):
    config = Config(model="vae", steps=2, compile=False)
    training.train(config, tmp_path, show_progress=False)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(ValueError, match="metrics.jsonl is not a file, so the run's log cannot be kept: move it aside"):
        training.train(Config(**{**config.to_dict(), "steps": 4}), tmp_path, resume=True, show_progress=False)
    assert checkpoint.read_metadata(tmp_path / run_folder.CHECKPOINT)["step"] == 2


def test_a_run_folder_another_process_trains_in_is_refused(tmp_path):
    """Two gen processes writing one folder would interleave their logs and overwrite each other's
    checkpoints. The lock another process holds (simulated: flock on a second open file, which
    conflicts as another process's would) stops a new run and a resume with one line."""
    import fcntl
    config = Config(model="vae", steps=2, compile=False)
    training.train(config, tmp_path / "run", show_progress=False)
    before = (tmp_path / "run" / run_folder.CHECKPOINT).read_bytes()
    (tmp_path / "new").mkdir()
    for out, resume in ((tmp_path / "run", True), (tmp_path / "new", False)):
        with open(out / run_folder.LOCK, "a") as other_process:
            fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ValueError, match=f"another gen process is training in {out}: wait for it"):
                training.train(Config(**{**config.to_dict(), "steps": 4}), out, resume=resume, show_progress=False)
    assert (tmp_path / "run" / run_folder.CHECKPOINT).read_bytes() == before
    assert [p.name for p in (tmp_path / "new").iterdir()] == [run_folder.LOCK]  # nothing written
    training.train(config, tmp_path / "new", show_progress=False)  # the lock's file alone: a fresh folder
    training.train(Config(**{**config.to_dict(), "steps": 4}), tmp_path / "run", resume=True, show_progress=False)
    assert checkpoint.read_metadata(tmp_path / "run" / run_folder.CHECKPOINT)["step"] == 4


def test_a_checkpoint_written_while_a_run_starts_is_not_overwritten(tmp_path, monkeypatch):
    """Between a run's checks and its lock another process may finish and save: checked again."""
    config = Config(model="vae", steps=2, compile=False)
    training.train(config, tmp_path / "run", show_progress=False)
    training.train(Config(**{**config.to_dict(), "steps": 3}), tmp_path / "later", show_progress=False)
    later = (tmp_path / "later" / run_folder.CHECKPOINT).read_bytes()
    lock = run_folder.lock

    def lock_after_another_save(out):
        (tmp_path / "run" / run_folder.CHECKPOINT).write_bytes(later)  # the other process's step 3
        return lock(out)
    monkeypatch.setattr(run_folder, "lock", lock_after_another_save)
    with pytest.raises(ValueError, match="changed while this run started \\(another gen process\\?\\): run "):
        training.train(Config(**{**config.to_dict(), "steps": 4}), tmp_path / "run", resume=True, show_progress=False)
    assert (tmp_path / "run" / run_folder.CHECKPOINT).read_bytes() == later


def test_a_checkpoint_written_while_a_new_run_starts_is_not_overwritten(tmp_path, monkeypatch):
    config = Config(model="vae", steps=2, compile=False)
    training.train(config, tmp_path / "other", show_progress=False)
    theirs = (tmp_path / "other" / run_folder.CHECKPOINT).read_bytes()
    lock = run_folder.lock

    def lock_after_another_run_saved(out):
        (out / run_folder.CHECKPOINT).write_bytes(theirs)
        return lock(out)
    monkeypatch.setattr(run_folder, "lock", lock_after_another_run_saved)
    with pytest.raises(ValueError, match="already holds a checkpoint: pass --resume"):
        training.train(config, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / run_folder.CHECKPOINT).read_bytes() == theirs


def test_a_lock_file_that_is_a_folder_or_a_link_is_named(tmp_path):
    """A link would have created a file wherever it pointed; a folder had been blamed on permissions."""
    config = Config(model="vae", steps=2, compile=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_folder.LOCK).mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / run_folder.LOCK).symlink_to(tmp_path / "elsewhere")
    for out in (tmp_path / "run", tmp_path / "linked"):
        with pytest.raises(ValueError, match=f"cannot open the run folder's lock file {out / run_folder.LOCK} .*: "
                                             "remove it if it is not an empty file gen made"):
            training.train(config, out, show_progress=False)
    assert not (tmp_path / "elsewhere").exists()


def test_without_flock_a_run_goes_unguarded_and_its_errors_stay_its_own(tmp_path, monkeypatch):
    """Windows has no fcntl: runs train, and an error inside one is not chained to the failed import."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    with pytest.raises(RuntimeError) as error:
        with run_folder.lock(tmp_path):
            raise RuntimeError("inside the run")
    assert error.value.__context__ is None
    training.train(Config(model="vae", steps=2, compile=False), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / run_folder.LOCK).exists()


def test_a_new_run_refuses_a_folder_that_is_not_empty(tmp_path):
    """A folder of someone's files, or of a run killed before its first checkpoint: nothing is overwritten."""
    (tmp_path / "config.json").write_text("my settings")
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    with pytest.raises(ValueError, match="is not empty: a new run needs a new or empty folder"):
        training.train(Config(model="vae", steps=2, compile=False), tmp_path, show_progress=False)
    assert (tmp_path / "config.json").read_text() == "my settings"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 3}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]
    # gen's own config.json beside a file of someone else's: still refused
    (tmp_path / "config.json").write_text(json.dumps(Config(model="vae").to_dict()))
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        training.train(Config(model="vae", steps=2, compile=False), tmp_path, show_progress=False)
    (tmp_path / "notes.txt").unlink()
    # a config.json with gen's names and others of its own is not gen's
    (tmp_path / "config.json").write_text(json.dumps({"model": "vae", "data": "digits", "seed": 0, "owner": "me"}))
    with pytest.raises(ValueError, match="is not empty"):
        training.train(Config(model="vae", steps=2, compile=False), tmp_path, show_progress=False)
    # only what a run writes before its first checkpoint: taken over
    (tmp_path / "config.json").write_text(json.dumps(Config(model="vae").to_dict()))
    training.train(Config(model="vae", steps=2, compile=False), tmp_path, show_progress=False)
    assert checkpoint.read_metadata(tmp_path / run_folder.CHECKPOINT)["step"] == 2


@pytest.mark.parametrize("config, message", [
    (Config(model="vae", data="ring8"), "trains on images"),
    (Config(model="vae", batch_size=5000), "exceeds"),
    (Config(model="vae", iwae_k=5, beta=2.0), "drop one of the two"),
    (Config(model="vae", epochs=0), "--epochs must be at least 1"),
    (Config(model="nope"), "unknown model 'nope'"),
])
def test_bad_configs_are_one_line_value_errors(tmp_path, config, message):
    with pytest.raises(ValueError, match=message) as error:
        training.train(config, tmp_path, show_progress=False)
    assert "\n" not in str(error.value)


class TickingClock:
    """time with a perf_counter that advances one second a call: two runs that time the same way
    see the same seconds, whatever the machine does."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_samples_per_second_counts_every_real_batch_a_step_takes(tmp_path, monkeypatch):
    # A WGAN-GP step with n_critic = 5 takes five real batches: the same steps in the same
    # (ticking) seconds are five times the samples of n_critic = 1.
    rates = {}
    for n_critic in (1, 5):
        monkeypatch.setattr(training, "time", TickingClock())
        config = Config(model="wgan-gp", data="ring8", steps=6, log_every=3, batch_size=32, n_critic=n_critic,
                        compile=False)
        training.train(config, tmp_path / str(n_critic), show_progress=False)
        rates[n_critic] = [r["samples_per_s"] for r in rows(tmp_path / str(n_critic)) if "samples_per_s" in r]
    assert len(rates[1]) == 2 and rates[5] == [pytest.approx(5 * rate, abs=0.5) for rate in rates[1]]  # rounded to 0.1

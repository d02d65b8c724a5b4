"""The command line end to end: gen train / sample / info, and a one-line error for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from gen import data
from idx_files import write_idx_dir

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def gen(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "vae-run"
    result = gen("train", "vae", "--steps", 25, "--no-compile", "--no-progress", "--out", out)
    assert result.exit_code == 0, result.output
    assert "trained 25 steps on cpu (eager)" in result.output and "test_loss" in result.output
    return out


def test_train_writes_the_run_folder(run):
    for name in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "samples.png", "loss.png"):
        assert (run / name).stat().st_size > 0, name
    # options not given take the library's defaults: the command line keeps no defaults of its own
    from gen.config import Config
    config = json.loads((run / "config.json").read_text())
    assert (config["log_every"], config["sample_every"], config["seed"]) == \
        (Config().log_every, Config().sample_every, Config().seed)


def test_sample_png_and_raw_safetensors(run, tmp_path):
    assert gen("sample", run, "--n", 16, "--out", tmp_path / "grid.png").exit_code == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gen("sample", run / "checkpoint.safetensors", "--n", 10, "--out", tmp_path / "raw.safetensors").exit_code == 0
    samples = load_file(tmp_path / "raw.safetensors")["samples"]
    assert samples.shape == (10, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tmp_path):
    result = gen("train", "vae", "--lr", "1e30", "--steps", 20, "--log-every", 5, "--no-compile",
                 "--no-progress", "--out", tmp_path / "run")
    assert_one_line_error(result, "training diverged: the logged metrics became NaN or infinite by step 5; "
                                  "no checkpoint was written: start a new run with a lower --lr")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    # the diverged row is logged, in strict JSON: its NaN as null
    import json

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    logged = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert logged[-1]["step"] == 5 and None in logged[-1].values()
    # the same command with a sound --lr may take the folder over: it holds only the failed run's files
    retried = gen("train", "vae", "--steps", 20, "--log-every", 5, "--no-compile", "--no-progress",
                  "--out", tmp_path / "run")
    assert retried.exit_code == 0, retried.output
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_checkpoints_with_damaged_metadata_get_one_line_errors(run, tmp_path):
    """Gen's header with fields of the wrong type: every command that reads it answers in one line."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    source = run / "checkpoint.safetensors"
    with safe_open(source, framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    metadata = json.loads(header["gen"])
    for name, damage, fragment in (("noshape", {"shape": None}, "'shape' missing"),
                                   ("badcfg", {"config": "vae"}, "'config' missing or not a JSON object"),
                                   ("badepoch", {"epoch": "one"}, "'epoch' is not a number"),
                                   ("badlr", {"config": {**metadata["config"], "lr": "fast"}}, "lr='fast'"),
                                   ("kindfoo", {"data_kind": "foo"}, "'data_kind' 'foo', neither"),
                                   ("kindpoints", {"data_kind": "points"}, "for points data, whose shape has 1"),
                                   ("shape2", {"shape": [8, 8]}, "'shape' [8, 8] for image data")):
        path = tmp_path / name / "checkpoint.safetensors"
        path.parent.mkdir()
        save_file(tensors, path, metadata={**header, "gen": json.dumps({**metadata, **damage})})
        for args in (["sample", path, "--out", tmp_path / "x.png"], ["info", path],
                     ["train", "vae", "--resume", "--steps", 30, "--no-compile", "--out", path.parent]):
            if args[0] == "info" and name == "badlr":
                continue  # info prints the config as it is
            assert_one_line_error(gen(*args), fragment)


def test_sample_checks_a_checkpoints_config_before_building_its_model(run, tmp_path):
    """Metadata of the right types but values no run could have: one line from `gen sample`, as
    from `train --resume`, instead of a traceback from the model's init or the plot."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(run / "checkpoint.safetensors", framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    metadata = json.loads(header["gen"])
    config = metadata["config"]
    for name, damage, fragment in (
            ("negative", {"config": {**config, "hidden_dim": -5}}, "--hidden-dim must be at least 1"),
            ("zero", {"config": {**config, "latent_dim": 0}}, "--latent-dim must be at least 1"),
            ("seed", {"config": {**config, "seed": 2 ** 70}}, "--seed must be between"),
            ("model", {"config": {**config, "model": "gan"}}, "model 'vae' but a 'gan' config"),
            ("points", {"config": {**config, "data": "ring8"}}, "trained on 'ring8' cannot make image"),
            ("toolarge", {"config": {**config, "hidden_dim": 10 ** 12}}, "--hidden-dim 1000000000000 is too large"),
            ("huge", {"config": {**config, "hidden_dim": 2 ** 31 - 1, "latent_dim": 2 ** 31 - 1}},
             "not enough memory to build the model")):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata={**header, "gen": json.dumps({**metadata, **damage})})
        assert_one_line_error(gen("sample", path, "--out", tmp_path / "x.png"), fragment)
        assert not (tmp_path / "x.png").exists()


def test_info_counts_any_parameter_tree_and_refuses_a_lone_params_tensor(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(run / "checkpoint.safetensors", framework="pt") as handle:
        header = handle.metadata()
    save_file({"params/a/b": torch.zeros(3, 4), "params/c": torch.zeros(5)}, tmp_path / "nested.safetensors",
              metadata=header)
    result = gen("info", tmp_path / "nested.safetensors")
    assert result.exit_code == 0 and "parameters: 17" in result.output, result.output
    save_file({"params": torch.zeros(3)}, tmp_path / "lone.safetensors", metadata=header)
    assert_one_line_error(gen("info", tmp_path / "lone.safetensors"), "holds no parameter tree")


def test_sample_refuses_an_unknown_device_in_one_line(run, tmp_path):
    assert_one_line_error(gen("sample", run, "--device", "tpu", "--out", tmp_path / "s.png"),
                          "unknown device 'tpu': use auto, cpu or cuda")
    assert not (tmp_path / "s.png").exists()


def test_sample_never_overwrites_a_checkpoint(run, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes((run / "checkpoint.safetensors").read_bytes())
    for target in (run / "checkpoint.safetensors", other):
        before = target.read_bytes()
        assert_one_line_error(gen("sample", run, "--n", 4, "--out", target), "is a gen checkpoint")
        assert target.read_bytes() == before
    # a file of raw samples (safetensors, not a checkpoint) is replaced as before
    assert gen("sample", run, "--n", 4, "--out", tmp_path / "raw.safetensors").exit_code == 0
    assert gen("sample", run, "--n", 5, "--out", tmp_path / "raw.safetensors").exit_code == 0
    assert load_file(tmp_path / "raw.safetensors")["samples"].shape[0] == 5


def test_sample_out_that_cannot_be_a_file_is_one_line(run, tmp_path):
    (tmp_path / "afile").write_text("mine")
    assert_one_line_error(gen("sample", run, "--n", 4, "--out", tmp_path / "afile" / "x.png"),
                          "cannot create the folder of --out")
    (tmp_path / "dir.png").mkdir()
    assert_one_line_error(gen("sample", run, "--n", 4, "--out", tmp_path / "dir.png"), "is a directory")
    assert (tmp_path / "afile").read_text() == "mine" and list((tmp_path / "dir.png").iterdir()) == []


def test_sampling_is_reproducible_by_seed(run, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        gen("sample", run, "--n", 4, "--seed", seed, "--out", tmp_path / f"{name}.safetensors")
    a, b, c = (load_file(tmp_path / f"{n}.safetensors")["samples"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_info_prints_model_step_and_parameter_count(run):
    result = gen("info", run)
    assert result.exit_code == 0
    # 1,500 training digits in batches of 128 make 11 steps an epoch: 25 steps are 2.27 epochs
    assert "model:      vae" in result.output and "step:       25 (epoch 2.27)" in result.output
    assert "parameters: 76,104" in result.output  # 64-400-20 MLP VAE on 8x8 digits
    import gen as package
    assert f"versions:   gen {package.__version__}, torch {torch.__version__}" in result.output
    assert "data:       digits (1, 8, 8)" in result.output
    config = next(line for line in result.output.splitlines() if line.startswith("config:"))
    assert "model=vae" in config and "lr=0.001" in config and "steps=25" in config


def test_sample_without_out_writes_samples_png_in_the_working_directory(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gen("sample", run, "--n", 4).exit_code == 0
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_options_reach_the_runs_config(tmp_path):
    result = gen("train", "wgan-gp", "--data", "ring8", "--steps", 1, "--batch-size", 8, "--n-critic", 2,
                 "--gp-weight", 3, "--optimizer", "adamw", "--weight-decay", 0.5, "--lr", 0.01, "--seed", 7,
                 "--latent-dim", 4, "--hidden-dim", 16, "--no-compile", "--no-progress", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {name: config[name] for name in ("n_critic", "gp_weight", "optimizer", "weight_decay", "lr", "seed",
                                            "latent_dim", "hidden_dim", "batch_size")} == {
        "n_critic": 2, "gp_weight": 3.0, "optimizer": "adamw", "weight_decay": 0.5, "lr": 0.01, "seed": 7,
        "latent_dim": 4, "hidden_dim": 16, "batch_size": 8}


def test_the_progress_bar_shows_by_default_and_not_with_no_progress(tmp_path):
    """Off a terminal rich prints the bar once, finished: the run's name, steps done of all, the losses."""
    shown = gen("train", "vae", "--steps", 10, "--log-every", 5, "--no-compile", "--out", tmp_path / "shown")
    hidden = gen("train", "vae", "--steps", 10, "--log-every", 5, "--no-compile", "--no-progress",
                 "--out", tmp_path / "hidden")
    assert shown.exit_code == hidden.exit_code == 0, shown.output + hidden.output
    bar = shown.output.splitlines()[0]
    assert bar.startswith("vae on digits") and "10/10" in bar and "loss " in bar and "samples/s" in bar
    assert "vae on digits" not in hidden.output and "10/10" not in hidden.output
    assert hidden.output.startswith("trained 10 steps")


def test_bench_options_reach_the_harness(tmp_path):
    path = tmp_path / "bench.json"
    result = gen("bench", "vae", "--batch-size", 16, "--batch-size", 24, "--steps", 3, "--repeats", 2,
                 "--mode", "eager", "--mode", "module", "--device", "cpu", "--no-compile-times", "--json", path)
    assert result.exit_code == 0, result.output
    rows = json.loads(path.read_text())["results"]
    assert [(r["model"], r["batch_size"], r["mode"], r["device"], r["steps"], r["repeats"]) for r in rows] == [
        ("vae", b, mode, "cpu", 3, 2) for b in (16, 24) for mode in ("eager", "module")]
    # A budget spent early (when depends on the machine): no group gets all the rounds asked for, the last none.
    result = gen("bench", "vae", "gan-2d", "--batch-size", 16, "--steps", 1, "--repeats", 50, "--mode", "eager",
                 "--device", "cpu", "--no-compile-times", "--time-budget", 0.05, "--json", tmp_path / "budget.json")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "budget.json").read_text())
    assert written["machine"]["time_budget_s"] == 0.05
    vae_row, gan_row = written["results"]
    assert vae_row["error"] == "skipped: time budget spent" or 1 <= vae_row["repeats"] < 50
    assert gan_row["error"] == "skipped: time budget spent"


def test_resume_extends_a_run(run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in run.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    result = gen("train", "vae", "--resume", "--out", copy, "--steps", 30, "--no-compile", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "trained 30 steps" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["vae", "--ema-decay", "0.9"], "--ema-decay does not apply to vae (only to gan, dcgan, wgan-gp, sngan)"),
    (["vae", "--pack", "4"], "--pack does not apply to vae"),
    (["conv-vae", "--gan-loss", "hinge"], "--gan-loss does not apply to conv-vae"),
    (["vae", "--n-critic", "3"], "--n-critic does not apply to vae"),
    (["gan", "--beta", "3"], "--beta does not apply to gan (only to vae, conv-vae)"),
    (["sngan", "--iwae-k", "5"], "--iwae-k does not apply to sngan"),
    (["gan", "--gp-weight", "5"], "--gp-weight does not apply to gan (only to wgan-gp)"),
    (["dcgan", "--hidden-dim", "7"], "--hidden-dim does not apply to dcgan"),
    (["sngan", "--data", "digits", "--pack", "2"], "--pack applies to the MLP discriminators of gan and sngan only, "
                                                   "and sngan on images has a convolutional discriminator"),
    (["sngan", "--data", "digits", "--hidden-dim", "7"], "--hidden-dim does not apply to sngan on images"),
    (["vae", "--data-dir", "/nonexistent"], "--data-dir is where fashion-mnist and mnist are looked for; "
                                            "'digits' does not use it"),
])
def test_options_the_model_does_not_read_are_refused(args, fragment, tmp_path):
    """Accepted, they were recorded in the run's config and changed nothing."""
    assert_one_line_error(gen("train", *args, "--steps", 2, "--no-compile", "--no-progress", "--out", tmp_path / "o"),
                          fragment)
    assert not (tmp_path / "o").exists()


def test_resume_keeps_how_the_run_runs_and_reports_unless_given_again(tmp_path):
    import json
    out = tmp_path / "run"
    first = gen("train", "vae", "--steps", 4, "--log-every", 2, "--sample-every", 3, "--no-compile", "--device", "cpu",
                "--no-progress", "--out", out)
    assert first.exit_code == 0, first.output
    resumed = gen("train", "vae", "--resume", "--out", out, "--steps", 8, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    config = json.loads((out / "config.json").read_text())
    assert (config["log_every"], config["sample_every"], config["compile"], config["device"]) == (2, 3, False, "cpu")
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open() if '"loss"' in line]
    assert logged == [2, 4, 6, 8] and (out / "samples" / "step_0000006.png").exists()
    # restating the run's own value of an option a VAE does not read (its config holds ema_decay 0.0) passes
    again = gen("train", "vae", "--resume", "--out", out, "--steps", 12, "--log-every", 4, "--sample-every", 5,
                "--ema-decay", 0, "--no-progress")
    assert again.exit_code == 0, again.output
    config = json.loads((out / "config.json").read_text())
    assert (config["log_every"], config["sample_every"]) == (4, 5)
    assert (out / "samples" / "step_0000010.png").exists() and not (out / "samples" / "step_0000009.png").exists()
    # --epochs on resume: the run's length in epochs (11 steps each), 22 steps in all
    longer = gen("train", "vae", "--resume", "--out", out, "--epochs", 2, "--no-progress")
    assert longer.exit_code == 0, longer.output
    assert "trained 22 steps" in longer.output


@pytest.mark.parametrize("args, fragment", [
    (["train", "nope"], "unknown model 'nope'"),
    (["train", "vae", "--data", "nope"], "unknown data set 'nope'"),
    (["train", "vae", "--data", "/nonexistent/idx"], "data directory '/nonexistent/idx' does not exist"),
    (["train", "vae", "--data", "mnist", "--data-dir", "/nonexistent"], "mnist not found"),
    # not the system's copy in its place: a mistyped --data-dir had trained on other data, silently
    (["train", "vae", "--data", "fashion-mnist", "--data-dir", "/nonexistent/typo"],
     "fashion-mnist not found (looked in: /nonexistent/typo)"),
    (["train", "vea", "--beta", "2"], "unknown model 'vea'"),  # the typo named, not --beta
    (["train", "vae", "--data", "mnis", "--data-dir", "/tmp"], "unknown data set 'mnis'"),
    (["train", "sngan", "--data", "nope", "--hidden-dim", "7"], "unknown data set 'nope'"),
    (["train", "vae", "--data", "ring8"], "trains on images"),
    (["train", "vae", "--batch-size", "5000"], "exceeds the 1500 training examples"),
    (["train", "vae", "--beta", "4", "--iwae-k", "5"], "drop one of the two"),
    (["train", "vae", "--lr", "-1"], "--lr must be positive"),
    (["train", "vae", "--latent-dim", "0"], "--latent-dim must be at least 1"),
    (["train", "vae", "--epochs", "2", "--steps", "3"], "not both"),
    (["train", "vae", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "vae", "--precision", "fp16"], "--precision must be float32 or bf16"),
    (["train", "vae", "--weight-decay", "0.1"], "use it with --optimizer adamw"),
    (["train", "vae", "--seed", str(2**64)], "--seed must be between -2^63 and 2^64 - 1"),
    (["train", "vae", "--seed", str(-2**63 - 1)], "--seed must be between -2^63 and 2^64 - 1"),
    (["sample", "/nonexistent/run"], "does not exist"),
    (["info", "/nonexistent/checkpoint.safetensors"], "does not exist"),
])
def test_bad_input_gets_one_line_error(args, fragment, tmp_path):
    assert_one_line_error(gen(*args, "--no-progress", "--out", tmp_path / "out") if args[0] == "train"
                          else gen(*args), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_an_error(tmp_path):
    assert_one_line_error(gen("train", "vae", "--device", "cuda", "--out", tmp_path / "o"), "no CUDA device")


def test_corrupt_checkpoint_is_refused_and_left_alone(run, tmp_path):
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes((run / "checkpoint.safetensors").read_bytes()[:100])
    before = bad.read_bytes()
    assert_one_line_error(gen("info", bad), "truncated or corrupt")
    assert_one_line_error(gen("sample", bad, "--out", tmp_path / "x.png"), "truncated or corrupt")
    assert_one_line_error(gen("train", "vae", "--resume", "--out", tmp_path, "--no-compile"), "truncated or corrupt")
    assert bad.read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "0.01"], "--lr cannot change when resuming"),
    (["--precision", "bf16"], "--precision cannot change when resuming"),
    (["--seed", "1"], "--seed cannot change when resuming: the run has 0"),
    (["--optimizer", "adamw"], "--optimizer cannot change when resuming"),
    (["--weight-decay", "0.5"], "--weight-decay cannot change when resuming: the run has 0.0"),
    (["--steps", "0"], "--steps must be at least 1"),  # refused like a new run's, not dropped
    (["--data", "fashion-mnist"], "holds a run on 'digits', not 'fashion-mnist'"),
])
def test_resume_refuses_to_change_what_the_run_trains(run, args, fragment):
    before = (run / "checkpoint.safetensors").read_bytes()
    length = [] if "--steps" in args else ["--steps", 30]
    assert_one_line_error(gen("train", "vae", "--resume", "--out", run, *length, "--no-compile",
                              "--no-progress", *args), fragment)
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_resume_refuses_to_lengthen_a_decaying_schedule(tmp_path):
    out = tmp_path / "run"
    assert gen("train", "vae", "--lr-schedule", "cosine", "--steps", 4, "--no-compile", "--no-progress",
               "--out", out).exit_code == 0
    assert_one_line_error(gen("train", "vae", "--resume", "--steps", 8, "--no-compile", "--no-progress", "--out", out),
                          "cosine learning-rate schedule reaches 0 at step 4")
    assert_one_line_error(gen("train", "vae", "--resume", "--no-compile", "--no-progress", "--out", out),
                          "already trained for 4 steps, the end of its cosine learning-rate schedule: a longer run "
                          "needs a new --out")


def test_resume_accepts_options_that_restate_the_run(run, tmp_path):
    """The same command line plus --resume (a train-or-resume script) changes nothing, so it runs."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in run.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    result = gen("train", "vae", "--resume", "--out", copy, "--steps", 30, "--seed", 0, "--batch-size", 128,
                 "--lr", 0.001, "--data", "digits", "--no-compile", "--no-progress")
    assert result.exit_code == 0, result.output


def test_existing_run_wrong_model_and_bad_output_name(run, tmp_path):
    assert_one_line_error(gen("train", "vae", "--out", run, "--no-compile"), "already holds a checkpoint")
    assert_one_line_error(gen("train", "vae", "--out", run / "config.json", "--no-compile"),
                          "is a file, not a run folder")
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--out", run / "config.json" / "deeper", "--no-compile"),
                          "cannot create the run folder")
    assert_one_line_error(gen("train", "conv-vae", "--resume", "--out", run), "holds a 'vae' run")
    assert_one_line_error(gen("sample", run, "--out", tmp_path / "x.jpg"), "ending in .png or .safetensors")
    assert_one_line_error(gen("sample", run, "--out", tmp_path / ".png"), "cannot write '.png': --out must be a file name")
    assert_one_line_error(gen("sample", run, "--n", "0", "--out", tmp_path / "x.png"), "--n must be at least 1")
    # 10^12 digits would take 256 TB: refused by the allocator, reported as one line, nothing written
    assert_one_line_error(gen("sample", run, "--n", 10**12, "--out", tmp_path / "x.safetensors"),
                          "not enough memory for 1,000,000,000,000 samples")
    assert not list(tmp_path.glob("*x.*"))


def test_an_allocator_out_of_memory_while_sampling_is_one_line(run, tmp_path, monkeypatch):
    """Memory that runs out below the RAM check (other processes, the grid's image) is reported too."""
    from gen import device, models, plots
    vae = models.get("vae")

    def exhausted(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(models, "get", lambda name: vae._replace(generate=exhausted))
    assert device.physical_memory_bytes() > 64 * 64 * 4
    # the samples themselves did not fit: a .safetensors file would not help
    assert_one_line_error(gen("sample", run, "--out", tmp_path / "x.png"), "not enough memory for 64 samples at once")
    assert not list(tmp_path.iterdir())

    def half_written(samples, path, **kwargs):  # the picture's writer runs out halfway
        path.write_bytes(b"\x89PNG half")
        raise MemoryError
    monkeypatch.setattr(models, "get", lambda name: vae)
    monkeypatch.setattr(plots, "image_grid", half_written)
    assert_one_line_error(gen("sample", run, "--out", tmp_path / "x.png"), "not enough memory for a picture of 64 ")
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_system_errors_name_the_file_and_what_to_do(run, tmp_path):
    """An OSError straight from the system had printed as "[Errno 36] File name too long: '...'"."""
    long_name = tmp_path / ("a" * 300)
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--no-compile", "--no-progress", "--out", long_name),
                          f"cannot use {long_name}: File name too long; a file or folder name may have at most "
                          "255 bytes: choose a shorter path")
    assert_one_line_error(gen("sample", run, "--out", f"{long_name}.png"), "File name too long; a file or folder")
    assert not list(tmp_path.iterdir())
    long_path = tmp_path.joinpath(*["c" * 250] * 20)  # every name within 255 bytes, the whole past 4,095
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--no-compile", "--no-progress", "--out", long_path),
                          "File name too long; a path may have at most 4,095 bytes: choose a shorter path")


def test_sample_never_replaces_a_checkpoint_or_a_file_behind_a_link(run, tmp_path, monkeypatch):
    """A checkpoint saved at --out while samples are drawn (a run started there) is kept; a link
    named like a picture to another kind of file (metrics.jsonl) is refused before any work."""
    from gen import checkpoint, models
    vae = models.get("vae")
    saved = run / "checkpoint.safetensors"

    def generate_while_a_run_saves(state, config, shape, n, generator):
        (tmp_path / "model.safetensors").write_bytes(saved.read_bytes())
        return vae.generate(state, config, shape, n, generator)
    monkeypatch.setattr(models, "get", lambda name: vae._replace(generate=generate_while_a_run_saves))
    assert_one_line_error(gen("sample", run, "--out", tmp_path / "model.safetensors"),
                          f"while sampling, --out {tmp_path / 'model.safetensors'} is a gen checkpoint, "
                          "which the samples would replace: give another file name")
    assert (tmp_path / "model.safetensors").read_bytes() == saved.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "view.png").symlink_to(tmp_path / "metrics.jsonl")
    assert_one_line_error(gen("sample", run, "--out", tmp_path / "view.png"),
                          f"links to {tmp_path / 'metrics.jsonl'}, which is not a .png file")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert checkpoint.is_checkpoint(tmp_path / "model.safetensors")


def test_ctrl_c_in_sample_or_info_is_one_line_without_importing_more(run, tmp_path, monkeypatch):
    """A Ctrl-C inside torch's import leaves it half-made; the error handling must not import gen
    (expected_errors() does) on the way out: that printed a page of unrelated tracebacks."""
    import cli
    from gen import checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "expected_errors", lambda: pytest.fail("expected_errors() was evaluated"))
    monkeypatch.setattr(cli, "write_samples", interrupted)
    monkeypatch.setattr(checkpoint, "load", interrupted)
    for args, message in ((("sample", run, "--out", tmp_path / "x.png"), "error: interrupted; --out is left as it was"),
                          (("info", run), "error: interrupted")):
        result = gen(*args)
        assert result.exit_code == 130 and result.stderr.strip() == message, result.output


def test_a_picture_too_big_for_memory_is_refused_before_sampling(run, tmp_path, monkeypatch):
    """A PNG grid of 8x8 digits is enlarged 8x: 4,000 samples take 1 MB as floats but about 40 MB
    as a picture. With 10 MB of memory the picture is refused before any sampling work, in one
    line that offers the raw samples instead, and those are written."""
    from gen import device, models, plots
    assert plots.image_grid_bytes(4000, 1, 8, 8, scale=8) > 10e6 > 4000 * 64 * 4
    monkeypatch.setattr(device, "physical_memory_bytes", lambda: 10e6)
    vae = models.get("vae")
    monkeypatch.setattr(models, "get", lambda name: vae._replace(generate=lambda *args: pytest.fail("sampled")))
    assert_one_line_error(gen("sample", run, "--n", 4000, "--out", tmp_path / "x.png"),
                          "not enough memory for a picture of 4,000 samples: ask for fewer with --n, or write "
                          "them to FILE.safetensors")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(models, "get", lambda name: vae)
    assert gen("sample", run, "--n", 4000, "--out", tmp_path / "x.safetensors").exit_code == 0
    assert (tmp_path / "x.safetensors").exists()


def test_a_model_too_big_for_memory_is_one_line(tmp_path, monkeypatch):
    """The allocator's refusal, simulated: a real one depends on the machine's overcommit policy."""
    from gen import models
    vae = models.get("vae")

    def exhausted(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(models, "get", lambda name: vae._replace(init=exhausted))
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--no-compile", "--no-progress", "--out", tmp_path / "big"),
                          "out of memory for this model and batch")


def test_sizes_past_what_torch_can_count_are_one_line(tmp_path):
    """2^31 - 1 by 2^31 - 1: each size is allowed, their product's bytes pass int64 and torch
    refuses to count them ("Storage size calculation overflowed"); past 2^31 - 1 validation
    refuses the size itself (past int64 torch would raise a TypeError)."""
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--latent-dim", 2**31 - 1, "--hidden-dim", 2**31 - 1,
                              "--no-compile", "--no-progress", "--out", tmp_path / "big"),
                          "out of memory for this model and batch")
    assert_one_line_error(gen("train", "vae", "--steps", 1, "--latent-dim", 2**64, "--no-compile", "--no-progress",
                              "--out", tmp_path / "bigger"), f"--latent-dim {2**64} is too large")


def test_gan_run_reports_its_own_losses_and_mode_coverage(tmp_path):
    """A GAN logs d_loss/g_loss (no "loss"): they are its final metrics and its loss curves,
    and the mixture's mode coverage is its evaluation."""
    out = tmp_path / "gan"
    result = gen("train", "gan", "--data", "ring8", "--steps", 30, "--log-every", 10, "--hidden-dim", 32,
                 "--pack", 2, "--lr-schedule", "linear", "--ema-decay", "0.9", "--no-compile", "--no-progress",
                 "--out", out)
    assert result.exit_code == 0, result.output
    final = result.output.split("final: ")[1].splitlines()[0]
    evaluation = result.output.split("evaluation: ")[1].splitlines()[0]
    assert "d_loss" in final and "g_loss" in final
    assert "modes" in evaluation and "d_loss" not in evaluation
    config = (out / "config.json").read_text()
    assert '"hidden_dim": 32' in config and '"pack": 2' in config and '"decay_steps": 30' in config
    assert (out / "loss.png").stat().st_size > 0


def test_a_bf16_sngan_run_keeps_float32_state_and_can_be_sampled_and_resumed(tmp_path):
    """Under `--precision bf16` the spectral norm's power-iteration vector u is state too: it must
    come out of the autocast step float32, or the checkpoint no longer matches its own config."""
    out = tmp_path / "sngan"
    common = ("--precision", "bf16", "--hidden-dim", 32, "--batch-size", 64, "--lr-schedule", "constant",
              "--log-every", 2, "--no-compile", "--no-progress", "--out", out)
    assert gen("train", "sngan", "--steps", 4, *common).exit_code == 0
    state = load_file(out / "checkpoint.safetensors")
    assert any(".u" in name for name in state)
    assert {t.dtype for t in state.values()} <= {torch.float32, torch.int64}, \
        {n: t.dtype for n, t in state.items() if t.dtype not in (torch.float32, torch.int64)}
    result = gen("sample", out, "--out", tmp_path / "samples.png")
    assert result.exit_code == 0, result.output
    result = gen("train", "sngan", "--steps", 6, "--resume", *common)
    assert result.exit_code == 0, result.output
    assert "trained 6 steps" in result.output


def test_resume_follows_a_moved_idx_directory(tmp_path):
    """A run on a directory of IDX files resumes with the directory's new path as --data."""
    (tmp_path / "old").mkdir()
    old_place = write_idx_dir(tmp_path / "old", n_train=40, size=8)
    out = tmp_path / "run"
    first = gen("train", "vae", "--data", old_place, "--batch-size", 8, "--steps", 4, "--no-compile",
                "--no-progress", "--out", out)
    assert first.exit_code == 0, first.output
    new_place = old_place.rename(tmp_path / "new")
    assert_one_line_error(gen("train", "vae", "--resume", "--out", out, "--steps", 8, "--no-compile",
                              "--no-progress"), "no longer exists: give its new place as --data")
    resumed = gen("train", "vae", "--resume", "--out", out, "--data", new_place, "--steps", 8, "--no-compile",
                  "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "trained 8 steps" in resumed.output and str(new_place) in (out / "config.json").read_text()
    (tmp_path / "bigger").mkdir()  # IDX files of another image size: named as such, not as a layer's size
    write_idx_dir(tmp_path / "bigger", n_train=40, size=12)
    assert_one_line_error(gen("train", "vae", "--resume", "--out", out, "--data", tmp_path / "bigger", "--steps", 12,
                              "--no-compile", "--no-progress"),
                          "was trained on data of shape (1, 8, 8) but")
    # the run's checkpoint file as --out, as `gen sample` and `gen info` take it
    resumed = gen("train", "vae", "--resume", "--out", out / "checkpoint.safetensors", "--data", new_place,
                  "--steps", 12, "--no-compile", "--no-progress")
    assert resumed.exit_code == 0 and "trained 12 steps" in resumed.output, resumed.output


def test_a_relative_idx_directory_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """`--data idx` from one directory, `--resume` from another: the run still finds its data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "idx").mkdir()
    write_idx_dir(tmp_path / "idx", n_train=40, size=8)
    first = gen("train", "vae", "--data", "idx", "--batch-size", 8, "--steps", 4, "--no-compile", "--no-progress")
    assert first.exit_code == 0, first.output
    assert "run folder: runs/vae-idx" in first.output
    monkeypatch.chdir(tmp_path / "runs")
    resumed = gen("train", "vae", "--resume", "--out", "vae-idx", "--steps", 8, "--no-compile", "--no-progress")
    assert resumed.exit_code == 0, resumed.output

    monkeypatch.chdir(tmp_path / "idx")  # `--data .`: a new run and its resume agree on the folder
    dot = gen("train", "vae", "--data", ".", "--batch-size", 8, "--steps", 4, "--no-compile", "--no-progress")
    assert dot.exit_code == 0 and "run folder: runs/vae-idx" in dot.output, dot.output
    resumed = gen("train", "vae", "--data", ".", "--resume", "--steps", 8, "--no-compile", "--no-progress")
    assert resumed.exit_code == 0 and "trained 8 steps" in resumed.output, resumed.output


def test_resume_without_out_finds_the_default_run_folder(tmp_path, monkeypatch):
    """`gen train gan` writes runs/gan-grid25 (its default data); `--resume` alone finds it there."""
    monkeypatch.chdir(tmp_path)
    first = gen("train", "gan", "--steps", 10, "--hidden-dim", 16, "--no-compile", "--no-progress")
    assert first.exit_code == 0, first.output
    resumed = gen("train", "gan", "--resume", "--steps", 20, "--no-compile", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "trained 20 steps" in resumed.output and "run folder: runs/gan-grid25" in resumed.output
    # a second new run never overwrites the first: it goes to runs/gan-grid25-2, then -3
    for suffix in ("-2", "-3"):
        again = gen("train", "gan", "--steps", 10, "--hidden-dim", 16, "--no-compile", "--no-progress")
        assert again.exit_code == 0 and f"run folder: runs/gan-grid25{suffix}" in again.output, again.output
    # sampling a 2D model draws a scatter plot against the data
    assert gen("sample", "runs/gan-grid25", "--n", 100, "--out", "points.png").exit_code == 0
    assert Path("points.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gen("sample", "runs/gan-grid25", "--n", 100, "--out", "points.safetensors").exit_code == 0
    assert load_file("points.safetensors")["samples"].shape == (100, 2)


@pytest.mark.parametrize("args, fragment", [
    (["--gan-loss", "least-squares"], "--gan-loss must be"),
    (["--lr-schedule", "step"], "--lr-schedule must be"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--pack", "3", "--batch-size", "64"], "multiple of --pack"),
])
def test_bad_gan_settings_get_one_line_errors(args, fragment, tmp_path):
    assert_one_line_error(gen("train", "gan", "--data", "ring8", *args, "--no-progress", "--out", tmp_path / "o"),
                          fragment)


@pytest.mark.parametrize("model", ["dcgan", "wgan-gp", "sngan"])
def test_image_gans_refuse_a_batch_of_one_for_their_batch_norm(tmp_path, model):
    assert_one_line_error(gen("train", model, "--data", "digits", "--batch-size", 1, "--steps", 2, "--no-compile",
                              "--no-progress", "--out", tmp_path / "run"),
                          f"--batch-size 1 is too small for {model}'s batch norm on images")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["conv-vae", "dcgan", "wgan-gp", "sngan"])
def test_convolutional_models_refuse_image_sides_not_divisible_by_4(tmp_path, model):
    (tmp_path / "idx10").mkdir()
    write_idx_dir(tmp_path / "idx10", size=10)  # two stride-2 layers: 10 -> 5 -> 2, decoded back to 8
    assert_one_line_error(gen("train", model, "--data", tmp_path / "idx10", "--batch-size", 4, "--steps", 2,
                              "--no-progress", "--out", tmp_path / "run"),
                          f"model '{model}' needs image sides divisible by 4")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["conv-vae", "dcgan", "wgan-gp", "sngan"])
def test_convolutional_models_train_and_sample_non_square_images(tmp_path, model):
    """12 high by 8 wide: each side carries its own size through the stride-2 layers."""
    (tmp_path / "idx12x8").mkdir()
    write_idx_dir(tmp_path / "idx12x8", n_train=24, size=12, width=8)
    out = tmp_path / "run"
    result = gen("train", model, "--data", tmp_path / "idx12x8", "--batch-size", 4, "--steps", 2, "--no-compile",
                 "--no-progress", "--out", out)
    assert result.exit_code == 0, result.output
    assert gen("sample", out, "--n", 3, "--out", tmp_path / "samples.safetensors").exit_code == 0
    assert load_file(tmp_path / "samples.safetensors")["samples"].shape == (3, 1, 12, 8)
    # Grids enlarge by the longer side (64 // 12 = 5): 8x8 tiles of 13x9 less the outer line, and 2x2.
    assert Image.open(out / "samples.png").size == ((8 * 9 - 1) * 5, (8 * 13 - 1) * 5)
    assert gen("sample", out, "--n", 3, "--out", tmp_path / "samples.png").exit_code == 0
    assert Image.open(tmp_path / "samples.png").size == ((2 * 9 - 1) * 5, (2 * 13 - 1) * 5)


def test_iwae_and_conv_vae_train_from_the_cli(tmp_path):
    for model, extra in (("vae", ["--iwae-k", "4"]), ("conv-vae", [])):
        result = gen("train", model, *extra, "--steps", 5, "--no-compile", "--no-progress", "--out", tmp_path / model)
        assert result.exit_code == 0, result.output
    assert "test_iwae_loss" in (tmp_path / "vae" / "metrics.jsonl").read_text()


def test_a_relative_data_dir_is_kept_absolute(tmp_path, monkeypatch):
    """As a --data directory is: a resume from another working directory finds the same files."""
    (tmp_path / "idx").mkdir()
    write_idx_dir(tmp_path / "idx", n_train=24, size=8)
    monkeypatch.chdir(tmp_path)
    result = gen("train", "vae", "--data", "mnist", "--data-dir", "idx", "--batch-size", 4, "--steps", 2,
                 "--no-compile", "--no-progress", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "idx")
    monkeypatch.chdir(tmp_path / "run")
    result = gen("train", "vae", "--resume", "--steps", 4, "--no-compile", "--no-progress", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(not data.FASHION_MNIST_SYSTEM_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_train_on_real_fashion_mnist(tmp_path):
    result = gen("train", "vae", "--data", "fashion-mnist", "--steps", 30, "--no-compile", "--no-progress",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "(1, 28, 28)" in gen("info", tmp_path).output


def test_python_cli_py_is_the_same_program(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # gen.mkl_amd's shim, if built, goes there
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    assert result.returncode == 0 and "train" in result.stdout and "sample" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "vae", "--steps", "abc"], "error: Invalid value for '--steps': Input should be a valid integer, "
                                         "unable to parse string as an integer (see 'gen train --help')"),
    (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see 'gen --help')"),
    (["train"], "error: Missing argument 'model'. (see 'gen train --help')"),
])
def test_a_command_line_that_does_not_parse_is_one_line(args, message, monkeypatch, capsys):
    """`gen` (cli.main) reports click's parse errors in one line, exit status 2, not in a box."""
    import cli
    monkeypatch.setattr(sys, "argv", ["gen", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_an_unusable_compile_cache_is_one_line_for_train_too(tmp_path, monkeypatch):
    """Even an eager run imports Dynamo, which creates the cache directory: a path under a file
    gave "[Errno 20] Not a directory" naming nothing gen had asked for."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert_one_line_error(gen("train", "vae", "--steps", 2, "--no-compile", "--no-progress", "--out", tmp_path / "run"),
                          f"TORCHINDUCTOR_CACHE_DIR {tmp_path / 'a-file' / 'cache'} cannot be used")
    assert not (tmp_path / "run").exists()


def test_an_interrupted_train_or_bench_exits_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C (KeyboardInterrupt) ends `gen train` with its one line and `gen bench` with its
    table, both with the shell's status for SIGINT, 130, not the 1 of an error."""
    import cli
    from gen import bench as harness, train as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("interrupted at step 3; checkpoint saved in somewhere: continue with --resume")
    monkeypatch.setattr(training, "train", interrupted)
    monkeypatch.setattr(harness, "main", interrupted)
    for args in (["train", "vae", "--out", str(tmp_path / "run")], ["bench", "vae:8", "--mode", "eager"]):
        monkeypatch.setattr(sys, "argv", ["gen", *args])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 130, args
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: interrupted at step 3; checkpoint saved in somewhere: continue with --resume"]


def test_gen_alone_prints_its_help_and_a_finished_command_exits_0(monkeypatch, capsys, run):
    import cli
    for args, status, text in ((["gen"], 2, "Usage: gen [OPTIONS] COMMAND"), (["gen", "info", str(run)], 0, "step:")):
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == status and text in capsys.readouterr().out

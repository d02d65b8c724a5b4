"""bench/grid25_sweep.py, issue 3's sweep script: which runs it selects, what it refuses, and one
short run through `run_one` whose row carries the results docs/gan_results.md is built from."""

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "grid25_sweep.py"


@pytest.fixture
def sweep():
    """The script as a module. Importing it sets one-thread variables in os.environ, and run_one
    sets torch to one thread: both are put back, so the tests after these keep their threads."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("grid25_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


def test_list_selects_the_named_runs_with_scaled_steps(sweep, tmp_path, capsys):
    sweep.main(["--list", "--only", "pacgan4-decay,sngan-decay", "--seeds", "3,4", "--steps-scale", "0.001",
                "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    listed = [(line.split()[0], int(line.split()[2]), int(line.split()[3])) for line in lines]
    expected_steps = {name: max(1, round(sweep.CONFIGS[name][2] * 0.001)) for name in ("pacgan4-decay", "sngan-decay")}
    assert listed == [(name, seed, expected_steps[name]) for name in expected_steps for seed in (3, 4)]
    assert json.loads(lines[0].split("steps  ", 1)[1]) == sweep.CONFIGS["pacgan4-decay"][0]
    assert not any(tmp_path.iterdir())  # --list writes nothing


def test_a_configuration_outside_the_default_sweep_runs_only_when_named(sweep, capsys):
    sweep.main(["--list"])
    assert "pacgan4-decay-ema-h256" not in capsys.readouterr().out  # it has no default seeds
    sweep.main(["--list", "--only", "pacgan4-decay-ema-h256"])
    assert capsys.readouterr().out.split()[:3] == ["pacgan4-decay-ema-h256", "seed", "0"]


def test_unknown_names_and_taken_runs_are_refused(sweep, tmp_path):
    with pytest.raises(SystemExit, match="error: unknown configuration nope: use one of pacgan4-decay-ema, "):
        sweep.main(["--only", "nope", "--out", str(tmp_path)])
    (tmp_path / "runs" / "sngan-decay_seed0").mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"error: {tmp_path}/runs already holds 1 of these runs "
                                         r"\(e.g. sngan-decay_seed0\): choose another --out"):
        sweep.main(["--only", "sngan-decay", "--out", str(tmp_path)])


def test_run_one_trains_evaluates_and_plots(sweep, tmp_path):
    """Three compiled steps of the candidate (PacGAN4, linear decay, EMA): the row holds the final
    evaluation of the run's own metrics.jsonl, and the plot and run folder are written."""
    settings = sweep.CONFIGS["pacgan4-decay-ema"][0]
    row = sweep.run_one({"name": "pacgan4-decay-ema", "seed": 0, "steps": 3, "settings": settings,
                         "out": str(tmp_path)})
    assert "error" not in row, row.get("traceback")
    run = tmp_path / "runs" / "pacgan4-decay-ema_seed0"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in logged if "modes_captured" in r][-1]
    assert row["modes_captured"] == evaluation["modes_captured"]
    assert row["high_quality_pct"] == round(evaluation["high_quality_pct"], 2)
    assert row["target_met"] is (evaluation["modes_captured"] == 25 and evaluation["high_quality_pct"] >= 90)
    assert row["curve"] == [[3, evaluation["modes_captured"], round(evaluation["high_quality_pct"], 1)]]
    assert row["graphs_compiled"] == 1
    assert (tmp_path / "plots" / "pacgan4-decay-ema_seed0.png").stat().st_size > 0
    table = sweep.summary_table([row])
    assert f"pacgan4-decay-ema: target met in {int(row['target_met'])} of 1 seeds" in table


def test_a_failing_run_becomes_a_row_and_the_table_shows_it(sweep, tmp_path):
    (tmp_path / "runs" / "sngan-decay_seed0").mkdir(parents=True)
    (tmp_path / "runs" / "sngan-decay_seed0" / "checkpoint.safetensors").write_bytes(b"taken")
    row = sweep.run_one({"name": "sngan-decay", "seed": 0, "steps": 2, "settings": sweep.CONFIGS["sngan-decay"][0],
                         "out": str(tmp_path)})
    assert row["error"].startswith("ValueError: ") and "already holds a checkpoint" in row["error"]
    assert (tmp_path / "runs" / "sngan-decay_seed0" / "checkpoint.safetensors").read_bytes() == b"taken"
    table = sweep.summary_table([row])
    assert "sngan-decay                     0      2 ERROR ValueError: " in table
    assert "sngan-decay: target met in 0 of 1 seeds" in table



@pytest.mark.parametrize("modes, hq, met", [(25, 90.0, True), (25, 89.9, False), (24, 99.0, False)])
def test_run_one_reports_the_runs_figures(sweep, tmp_path, monkeypatch, modes, hq, met):
    """The row's figures from train()'s summary and metrics.jsonl, with an eager 2-step run standing in
    for the training (its checkpoint feeds the plot): the target (25 modes and >= 90 % high quality),
    training seconds without the compile, steps/s, and the curve at every len // 10-th evaluation,
    ending at the last. One thread in the worker."""
    import gen.train
    real_train, seen = gen.train.train, {}

    def train(config, run_dir, show_progress=True):
        seen["threads"] = torch.get_num_threads()
        summary = real_train(replace(config, compile=False), run_dir, show_progress=show_progress)
        evaluations = [{"step": 100 * i, "modes_captured": i, "high_quality_pct": i + 0.04} for i in range(1, 26)]
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
        return {**summary, "compile_seconds": 20.0, "graphs_compiled": 1,
                "evaluation": {"modes_captured": modes, "high_quality_pct": hq, "reverse_kl": 0.123456}}

    monkeypatch.setattr(gen.train, "train", train)
    clock = iter([100.0, 160.0])  # run_one's start and the end of train(): 60 s, 20 of them compiling
    monkeypatch.setattr(sweep, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    row = sweep.run_one({"name": "pacgan4-decay-ema", "seed": 0, "steps": 2,
                         "settings": sweep.CONFIGS["pacgan4-decay-ema"][0], "out": str(tmp_path)})
    assert "error" not in row, row.get("traceback")
    assert seen["threads"] == 1
    assert row["target_met"] is met and row["modes_captured"] == modes and row["reverse_kl"] == 0.1235
    assert (row["wall_seconds"], row["compile_seconds"], row["seconds"], row["steps_per_s"]) == (60.0, 20.0, 40.0, 0.1)
    assert row["curve"] == [[100 * i, i, round(i + 0.04, 1)] for i in range(2, 26, 2)]  # every 2nd of 25
    line = sweep.summary_table([row]).splitlines()[2]
    assert line.split()[-1] == ("yes" if met else "no")


class InlinePool:
    """multiprocessing's spawn pool stood in for: the runs happen here, in order."""
    made = []

    def __init__(self, **kwargs):
        InlinePool.made.append(kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, function, jobs):
        return map(function, jobs)


def test_main_runs_each_job_in_its_own_process_and_appends_every_row(sweep, tmp_path, monkeypatch, capsys):
    contexts = []
    monkeypatch.setattr(sweep.multiprocessing, "get_context",
                        lambda method: contexts.append(method) or SimpleNamespace(Pool=InlinePool))
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 16)
    InlinePool.made.clear()

    def run_one(job):
        met = job["name"] == "sngan-decay" and job["seed"] == 1
        return {"name": job["name"], "model": job["settings"]["model"], "settings": job["settings"],
                "seed": job["seed"], "steps": job["steps"], "modes_captured": 25 if met else 20,
                "high_quality_pct": 95.0, "reverse_kl": None, "seconds": 10.0, "compile_seconds": 2.0,
                "wall_seconds": 12.0, "steps_per_s": 1.0, "graphs_compiled": 1, "curve": [], "target_met": met}
    monkeypatch.setattr(sweep, "run_one", run_one)
    seeds = list(range(8))
    sweep.main(["--only", "sngan-decay,pacgan4-decay", "--seeds", ",".join(map(str, seeds)),
                "--steps-scale", "0.001", "--out", str(tmp_path)])
    assert contexts == ["spawn"] and InlinePool.made == [{"processes": 14, "maxtasksperchild": 1}]  # 16 cores - 2
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [(r["name"], r["seed"]) for r in map(json.loads, lines)] == \
        [(name, seed) for name in ("pacgan4-decay", "sngan-decay") for seed in seeds]
    table = capsys.readouterr().out.split("\n\n", 1)[1]
    names_and_seeds = [tuple(line.split()[:2]) for line in table.splitlines()[2:18]]
    assert names_and_seeds == [(name, str(seed)) for name in ("pacgan4-decay", "sngan-decay") for seed in seeds]
    assert "pacgan4-decay: target met in 0 of 8 seeds" in table and "sngan-decay: target met in 1 of 8 seeds" in table


def test_steps_fill_each_runs_training_time_rounded_down_to_500(sweep):
    for kind, ms in sweep.STEP_MS.items():
        exact = sweep.TRAIN_SECONDS.get(kind, sweep.DEFAULT_TRAIN_SECONDS) * 1000 / ms
        assert sweep.steps_for(kind) % 500 == 0 and 0 <= exact - sweep.steps_for(kind) < 500


def test_a_tiny_steps_scale_still_runs_one_step(sweep, capsys):
    sweep.main(["--list", "--only", "sngan-decay", "--steps-scale", "1e-9"])
    assert capsys.readouterr().out.split()[3] == "1"


def test_importing_the_sweep_sets_one_thread_unless_already_set(sweep, monkeypatch):
    """Imported again here: the `sweep` fixture puts os.environ back afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    spec = importlib.util.spec_from_file_location("grid25_sweep", SCRIPT)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]) == ("1", "1")
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "3"


def test_failing_run_row_keeps_wall_seconds(sweep, tmp_path):
    (tmp_path / "runs" / "sngan-decay_seed0").mkdir(parents=True)
    (tmp_path / "runs" / "sngan-decay_seed0" / "checkpoint.safetensors").write_bytes(b"taken")
    row = sweep.run_one({"name": "sngan-decay", "seed": 0, "steps": 2, "settings": sweep.CONFIGS["sngan-decay"][0],
                         "out": str(tmp_path)})
    assert "error" in row and row["wall_seconds"] >= 0

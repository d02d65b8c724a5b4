"""bench/grid25_sweep.py, issue 3's sweep script: which runs it selects, what it refuses, and one
short run through `run_one` whose row carries the results docs/gan_results.md is built from."""

import importlib.util
import json
import os
from pathlib import Path

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

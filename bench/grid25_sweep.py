"""Issue 3's grid25 sweep: named GAN configurations × seeds, one process per run, one core each.

    PYTHONPATH=. python bench/grid25_sweep.py --jobs 14 --out runs/sweep
    PYTHONPATH=. python bench/grid25_sweep.py --only pacgan4-decay-ema --steps-scale 0.1 --jobs 3 --out /tmp/s

Each run is `gen train` (gen.train.train: the compiled step, one graph, the data order and noise
from (seed, step), an evaluation at the end of every epoch) on grid25 — 25 Gaussians on
{-4,-2,0,2,4}², std 0.05 — on the CPU with one thread. Runs go to worker processes (spawn, so
no torch state is forked); as each finishes, one JSON line lands in OUT/results.jsonl:

    name, model, settings, seed, steps, modes_captured (of 25), high_quality_pct, reverse_kl,
    seconds (training only), compile_seconds, wall_seconds, steps_per_s, curve (mode coverage at
    about ten evaluations along the run), target_met (25 modes and ≥ 90 % high quality)

plus a scatter plot OUT/plots/NAME_seedK.png and the run folder OUT/runs/NAME_seedK. A summary
table is printed at the end. Issue 3's target: the best variant captures all 25 modes with
≥ 90 % high-quality samples for each of 3 seeds within 5 minutes of 2-core CPU training.

Step counts are sized from speeds measured on one core of the 2-core development machine
(STEP_MS): about 4 minutes a run there, compile included, and about 6 on a 16-core machine running
14 at once (measured: slower steps, slow parallel cold compiles; see TRAIN_SECONDS).
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

# One thread per run, set before torch is imported here and in every spawned worker (spawn
# re-imports this module): 14 runs on 16 cores must not each start a thread pool. Inductor's
# parallel compile workers would add 14 more pools; one compile thread per run is plenty.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

TARGET_MODES, TARGET_HQ = 25, 90.0

# The best configuration of docs/gan_results.md (PacGAN4, batch 512, Adam(1e-3, 0.5, 0.999),
# hidden 128, latent 8), which reached 25/25/15 modes at 88/73/70 % after 20k constant-lr steps.
BASE = {"model": "gan", "pack": 4, "batch_size": 512, "lr": 1e-3, "hidden_dim": 128}
DECAY = {"lr_schedule": "linear"}
EMA = {"ema_decay": 0.999}

# ms per training step of `gen train` at one thread on the 2-core development machine (AMD EPYC,
# torch 2.13.0+cpu, the other core busy), per-epoch evaluation and checkpoint included: measured
# with this script at --steps-scale 0.03-0.04.
STEP_MS = {"gan-b512-h128": 5.43, "gan-pack2": 6.80, "gan-b1024-h128": 8.06, "gan-b512-h256": 12.92,
           "gan-pack1": 8.62, "wgan-gp": 30.83, "sngan": 10.37}
# Training seconds per run at that speed. A 14-job smoke run on a 16-core machine (torch 2.11,
# --steps-scale 0.05) measured steps 10-15 % slower there and cold compiles of 76-117 s (WGAN-GP's
# double backward: 154 s) with 14 compiling at once, so 225 s here (about 260 s there) plus the
# compile keeps each run near 6 minutes there; here a run, compile included (about 20 s, WGAN-GP
# 67 s), takes about 4 minutes.
TRAIN_SECONDS = {"wgan-gp": 180}
DEFAULT_TRAIN_SECONDS = 225


def steps_for(kind: str) -> int:
    """Steps that fill the training time at the measured speed, rounded down to 500."""
    seconds = TRAIN_SECONDS.get(kind, DEFAULT_TRAIN_SECONDS)
    return int(seconds * 1000 / STEP_MS[kind]) // 500 * 500


# name -> (settings, seeds, steps). Comments say which question each run answers.
CONFIGS = {
    # the candidate: PacGAN4 + linear lr decay to 0 + generator EMA
    "pacgan4-decay-ema": ({**BASE, **DECAY, **EMA}, (0, 1, 2), steps_for("gan-b512-h128")),
    # does EMA matter once the lr decays?
    "pacgan4-decay": ({**BASE, **DECAY}, (0, 1, 2), steps_for("gan-b512-h128")),
    # does the decay matter (EMA alone, constant lr)?
    "pacgan4-ema": ({**BASE, **EMA}, (0,), steps_for("gan-b512-h128")),
    # a 2D latent for a 2D grid (on ring8 it turned 5-7 of 8 modes into 7-8, see tests/test_gan.py)
    "pacgan4-decay-ema-latent2": ({**BASE, **DECAY, **EMA, "latent_dim": 2}, (0, 1), steps_for("gan-b512-h128")),
    # less packing
    "pacgan2-decay-ema": ({**BASE, **DECAY, **EMA, "pack": 2}, (0,), steps_for("gan-pack2")),
    # a larger batch (fewer, less noisy steps)
    "pacgan4-decay-ema-b1024": ({**BASE, **DECAY, **EMA, "batch_size": 1024}, (0,), steps_for("gan-b1024-h128")),
    # wider networks (fewer steps in the same time); not in the default 14 runs, --only to add it
    "pacgan4-decay-ema-h256": ({**BASE, **DECAY, **EMA, "hidden_dim": 256}, (), steps_for("gan-b512-h256")),
    # no packing: what PacGAN buys
    "gan-decay-ema": ({**BASE, **DECAY, **EMA, "pack": 1}, (0,), steps_for("gan-pack1")),
    # the other families, family defaults + decay (WGAN-GP: Adam(1e-4, 0.5, 0.9), 5 critic steps)
    "wgan-gp-decay": ({"model": "wgan-gp", "batch_size": 256, "hidden_dim": 128, **DECAY}, (0,),
                      steps_for("wgan-gp")),
    # SNGAN covered 24 modes at lr 2e-4 but was still tightening: a higher rate, and the EMA
    "sngan-lr1e-3-decay-ema": ({"model": "sngan", "batch_size": 512, "hidden_dim": 128, "lr": 1e-3, **DECAY, **EMA},
                               (0, 1, 2), steps_for("sngan")),
    # WGAN-GP at its usual 1e-4 found no mode in 5,500 steps: the rate that works for the others
    "wgan-gp-lr1e-3-decay-ema": ({"model": "wgan-gp", "batch_size": 256, "hidden_dim": 128, "lr": 1e-3, **DECAY, **EMA},
                                 (0,), steps_for("wgan-gp")),
    "sngan-decay": ({"model": "sngan", "batch_size": 512, "hidden_dim": 128, "lr": 2e-4, **DECAY}, (0,),
                    steps_for("sngan")),
}


def run_one(job: dict) -> dict:
    """One training run in a worker process; never raises (an error becomes the result)."""
    torch.set_num_threads(1)
    from gen import checkpoint, models, plots, rng
    from gen.config import Config, resolve
    from gen.data import load
    from gen.run_folder import CHECKPOINT
    from gen.train import train

    name, seed, steps, settings, out = job["name"], job["seed"], job["steps"], job["settings"], Path(job["out"])
    tag = f"{name}_seed{seed}"
    run_dir = out / "runs" / tag
    row = {"name": name, "model": settings["model"], "settings": settings, "seed": seed, "steps": steps}
    start = time.perf_counter()
    try:
        config = Config(data="grid25", seed=seed, steps=steps, device="cpu", compile=True,
                        log_every=max(1, steps // 20), **settings)
        summary = train(config, run_dir, show_progress=False)
        wall = time.perf_counter() - start
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evaluations = [r for r in history if "modes_captured" in r]
        final = summary["evaluation"]
        # training seconds: train()'s wall time less the first step's compile; the per-epoch
        # evaluations and checkpoints stay in, as they do in any `gen train` run
        seconds = wall - summary["compile_seconds"]
        every = max(1, len(evaluations) // 10)
        curve = [[r["step"], r["modes_captured"], round(r["high_quality_pct"], 1)]
                 for r in evaluations[every - 1::every]]
        row.update({
            "modes_captured": final.get("modes_captured"), "high_quality_pct": round(final["high_quality_pct"], 2),
            "reverse_kl": round(final["reverse_kl"], 4) if "reverse_kl" in final else None,  # none: no point of high quality
            "seconds": round(seconds, 1), "compile_seconds": round(summary["compile_seconds"], 1),
            "wall_seconds": round(wall, 1), "steps_per_s": round(steps / seconds, 1) if seconds else None,
            "graphs_compiled": summary["graphs_compiled"], "curve": curve,
            "target_met": final.get("modes_captured") == TARGET_MODES and final["high_quality_pct"] >= TARGET_HQ,
        })
        # the final samples with the results in the title (EMA weights when the run has them)
        state, _ = checkpoint.load(run_dir / CHECKPOINT)
        family, dataset = models.get(settings["model"]), load("grid25", seed=seed)
        resolved = resolve(config, family.defaults)
        samples = family.generate(state, resolved, dataset.shape, resolved.eval_samples,
                                  rng.generator(seed, "samples"))
        (out / "plots").mkdir(parents=True, exist_ok=True)
        plots.scatter(samples, out / "plots" / f"{tag}.png", reference=dataset.test[:2500],
                      title=f"{tag}: {row['modes_captured']} modes, {row['high_quality_pct']:.1f}% HQ")
    except Exception as error:  # noqa: BLE001 — one broken run must not end the sweep
        row.update({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=5),
                    "wall_seconds": round(time.perf_counter() - start, 1)})
    return row


def summary_table(rows: list[dict]) -> str:
    header = f"{'name':<28} {'seed':>4} {'steps':>6} {'modes':>5} {'HQ %':>6} {'rev KL':>7} {'train s':>8} " \
             f"{'steps/s':>7} {'target':>6}"
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (list(CONFIGS).index(r["name"]) if r["name"] in CONFIGS else 99, r["seed"])):
        if "error" in r:
            lines.append(f"{r['name']:<28} {r['seed']:>4} {r['steps']:>6} ERROR {r['error'][:60]}")
            continue
        kl = "-" if r["reverse_kl"] is None else f"{r['reverse_kl']:.3f}"
        lines.append(f"{r['name']:<28} {r['seed']:>4} {r['steps']:>6} {r['modes_captured']:>5} "
                     f"{r['high_quality_pct']:>6.1f} {kl:>7} {r['seconds']:>8.1f} {r['steps_per_s'] or 0:>7.1f} "
                     f"{'yes' if r['target_met'] else 'no':>6}")
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    lines.append("")
    for name, group in by_name.items():
        ok = [r for r in group if r.get("target_met")]
        lines.append(f"{name}: target met in {len(ok)} of {len(group)} seeds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="runs in parallel, one core each (default: cores - 2)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's steps (smoke: 0.01)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this configuration (repeatable, or comma-separated)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds for every configuration")
    parser.add_argument("--out", default="runs/grid25-sweep", help="results.jsonl, plots/ and runs/ go here")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = parser.parse_args(argv)

    only = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in only if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown configuration {', '.join(unknown)}: use one of {', '.join(CONFIGS)}")
    out = Path(args.out)
    jobs = []
    for name, (settings, seeds, steps) in CONFIGS.items():
        if only and name not in only:
            continue
        if args.seeds:
            seeds = [int(s) for s in args.seeds.split(",")]
        elif not seeds:  # a configuration outside the default sweep: seed 0 when asked for by name
            seeds = (0,) if name in only else ()
        for seed in seeds:
            jobs.append({"name": name, "seed": seed, "settings": settings, "out": str(out),
                         "steps": max(1, round(steps * args.steps_scale))})
    if not jobs:
        sys.exit("error: no runs selected")
    if args.list:
        for job in jobs:
            print(f"{job['name']:<28} seed {job['seed']}  {job['steps']:>6} steps  {json.dumps(job['settings'])}")
        return
    taken = [j for j in jobs if (out / "runs" / f"{j['name']}_seed{j['seed']}").exists()]
    if taken:
        sys.exit(f"error: {out}/runs already holds {len(taken)} of these runs (e.g. {taken[0]['name']}_seed"
                 f"{taken[0]['seed']}): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    print(f"{len(jobs)} runs, {min(args.jobs, len(jobs))} at a time, torch {torch.__version__}, "
          f"{os.cpu_count()} cores -> {results_path}", flush=True)
    rows, start = [], time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(args.jobs, len(jobs)), maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            rows.append(row)
            with open(results_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            status = row.get("error") or (f"{row['modes_captured']} modes, {row['high_quality_pct']:.1f}% HQ, "
                                          f"{row['seconds']:.0f} s training + {row['compile_seconds']:.0f} s compile")
            print(f"[{len(rows)}/{len(jobs)} {time.perf_counter() - start:.0f}s] {row['name']} seed {row['seed']}: "
                  f"{status}", flush=True)
    print()
    print(summary_table(rows))


if __name__ == "__main__":
    main()

"""Train a GAN family on a 2D mixture with the training-loop contract of gen/models.py,
then report mode coverage and save a scatter plot.

    python bench/gan_toy.py sngan --data grid25 --seed 0 --steps 20000 [--set lr=2e-4 lr_schedule=linear ...]

(A stand-in for `gen train` while the CLI was being written; same noise derivation.
bench/grid25_sweep.py runs gen.train itself.)
"""

import argparse
import dataclasses
import json
import os
import time

import torch

from gen import data, models, rng
from gen.config import Config, resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data", default="grid25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, name=value")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("GEN_THREADS", "1")))  # 1 thread: the 2 cores are shared
    family = models.get(args.model)
    overrides = {}
    for item in args.set:
        name, value = item.split("=")
        kind = type(getattr(Config(), name)) if getattr(Config(), name) is not None else float
        overrides[name] = value if kind is str else (int(value) if "." not in value and "e" not in value else float(value))
    config = resolve(Config(model=args.model, data=args.data, seed=args.seed, steps=args.steps, **overrides),
                     family.defaults)
    if config.steps is None:
        parser.error("--steps is needed")
    if config.lr_schedule != "constant" and config.decay_steps is None:
        # as gen/train.py does: a schedule decays over the run's length
        config = dataclasses.replace(config, decay_steps=config.steps)
    dataset = data.load(args.data, seed=args.seed)
    shape = dataset.shape
    state = family.init(config, shape, args.seed)
    step = family.make_step(config, shape)
    if not args.eager:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    per_step = family.batches_per_step(config)
    stream = (b for epoch in range(10**9) for b in data.batches(dataset.train, config.batch_size, args.seed, epoch))
    start = time.time()
    for index in range(config.steps):
        batch = torch.stack([next(stream) for _ in range(per_step)]) if per_step > 1 else next(stream)
        inputs = family.make_noise(config, shape, config.batch_size, rng.generator(args.seed, "noise", index))
        state, metrics = step(state, batch, inputs)
        if index % 5000 == 0 or index == config.steps - 1:
            print(index, {k: round(v.item(), 3) for k, v in metrics.items()}, f"{time.time() - start:.0f}s",
                  flush=True)
    seconds = time.time() - start
    results = family.evaluate(state, config, dataset, args.seed)
    print(json.dumps({"model": args.model, "seed": args.seed, "seconds": round(seconds, 1), **results,
                      "config": {k: v for k, v in dataclasses.asdict(config).items() if v is not None}}))
    if args.plot:
        from gen import plots
        samples = family.generate(state, config, shape, config.eval_samples, torch.Generator().manual_seed(args.seed))
        plots.scatter(samples, args.plot, reference=dataset.test[:2500],
                      title=f"{args.model} {args.data} seed {args.seed}: {results.get('modes_captured')} modes, "
                            f"{results.get('high_quality_pct', 0):.1f}% HQ")


if __name__ == "__main__":
    main()

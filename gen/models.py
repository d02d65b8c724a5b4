"""The contract every model family meets, and the registry the CLI reads.

A family is a handful of pure functions. The training loop (gen/train.py)
knows nothing else about a model:

    state = family.init(config, shape, seed)          # {"params", "opt_state", ...}
    step = family.make_step(config, shape)            # pure; compiled once by the loop
    inputs = family.make_noise(config, shape, batch_size, generator)
    state, metrics = step(state, batch, inputs)       # metrics: dict of 0-d tensors
    samples = family.generate(state, config, shape, n, generator)
    results = family.evaluate(state, config, dataset, seed)

`batch` is (batches_per_step, B, *shape) when a step consumes several real
batches (WGAN-GP's critic iterations) and (B, *shape) otherwise. Every random
number the step uses arrives in `inputs`, drawn outside it from (seed, step),
so compiled and eager steps, and resumed runs, see identical numbers.
"""

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from gen import optim
from gen.config import Config
from gen.data import Dataset
from gen.tree import Tree


class Family(NamedTuple):
    name: str
    summary: str
    data_kinds: tuple[str, ...]  # "image", "points"
    defaults: dict
    init: Callable[[Config, tuple, int], Tree]
    make_step: Callable[[Config, tuple], Callable]
    make_noise: Callable[[Config, tuple, int, torch.Generator], dict[str, Tensor]]
    generate: Callable[[Tree, Config, tuple, int, torch.Generator], Tensor]
    evaluate: Callable[[Tree, Config, Dataset, int], dict[str, float]]
    batches_per_step: Callable[[Config], int] = lambda config: 1
    image_side_multiple: int = 1  # models with convolutions on images halve them twice: sides must divide by 4
    hidden_dim_on_images: bool = True  # False: on images the networks are DCGAN's, of fixed widths


def learning_rate(config: Config) -> float | optim.Schedule:
    """config.lr, or a schedule decaying it over config.decay_steps (the run's length,
    filled in by the training loop)."""
    if config.lr_schedule in (None, "constant"):
        return config.lr
    if config.decay_steps is None:
        raise ValueError(f"--lr-schedule {config.lr_schedule} needs the run's length: give --epochs or --steps")
    decay = optim.linear_decay if config.lr_schedule == "linear" else optim.cosine_decay
    return decay(config.lr, config.decay_steps)


def make_optimizer(config: Config) -> optim.Optimizer:
    lr = learning_rate(config)
    if config.optimizer == "sgd":
        return optim.sgd(lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return optim.adamw(lr, config.b1, config.b2, weight_decay=config.weight_decay)
    return optim.adam(lr, config.b1, config.b2)


def registry() -> dict[str, Family]:
    # Imported here so that each family module can import this one for Family.
    from gen import gan, vae
    families = [vae.MLP_VAE, vae.CONV_VAE, *gan.FAMILIES]
    return {family.name: family for family in families}


def get(name: str) -> Family:
    families = registry()
    if name not in families:
        raise ValueError(f"unknown model '{name}': use one of {', '.join(families)}")
    return families[name]

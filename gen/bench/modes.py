"""The benchmark's modes: for one model, a function that advances its own copy of the training
state n steps, gen's pure step compiled, uncompiled, vmapped, or the nn.Module peer."""

import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from gen import gan, models
from gen.compilation import compile_for_training, compile_step, steady, unchanged
from gen.config import Config, resolve
from gen.device import autocast_step
from gen.tree import Tree, leaves, to_device

# bench name -> (gen family, example shape, batch sizes timed by default)
MODELS = {
    "vae": ("vae", (1, 28, 28), (128, 512)),
    "conv-vae": ("conv-vae", (1, 28, 28), (128,)),
    "dcgan": ("dcgan", (1, 28, 28), (64,)),
    "gan-2d": ("gan", (2,), (256,)),
    "wgan-gp": ("wgan-gp", (2,), (256,)),
}
MODES = ("compiled", "undonated", "eager", "module")  # the default set
EXTRA_MODES = ("compiled-bf16", "compiled-ro")  # asked for by name
CUDA_MODES = ("compiled-ro",)  # skipped with a note on CPU
DONATED_MODES = ("compiled", "compiled-bf16")  # run as gen train runs its step: donated, guards skipped once warm
POOL = 4  # distinct batches/noise draws cycled through, so no step sees the very same tensors twice in a row
PEERS_DIR = Path(__file__).resolve().parents[2] / "bench"


def is_compiled(mode: str) -> bool:
    return mode in ("compiled", "undonated") or mode.startswith(("compiled-", "vmap-"))


# --- one model's pieces ---------------------------------------------------------------


def model_config(model: str, batch_size: int) -> tuple[models.Family, Config, tuple]:
    """The family, its default config at this batch size, and the example shape; ValueError
    for a batch size the model cannot train on (a GAN's batch norm on images needs 2 or more)."""
    family_name, shape, _ = MODELS[model]
    family = models.get(family_name)
    config = resolve(Config(model=family_name, batch_size=batch_size), family.defaults)
    if family in gan.FAMILIES:
        gan.check_batch_size(config, shape)
    return family, config, shape


def synthetic_inputs(family: models.Family, config: Config, shape: tuple, device: torch.device,
                     seed: int = 0, models_stacked: int = 0) -> list[tuple]:
    """POOL (batch, inputs) pairs on the device: images uniform in [0, 1], points N(0, I).

    With `models_stacked` = N > 0 every tensor gains a leading axis of N (one
    batch and one noise draw per ensemble member)."""
    per_step = family.batches_per_step(config)
    leading = (per_step,) if per_step > 1 else ()
    pool = []
    for index in range(POOL):
        generator = torch.Generator().manual_seed(seed * 1000 + index)

        def one_draw():
            size = (*leading, config.batch_size, *shape)
            batch = torch.rand(size, generator=generator) if len(shape) == 3 else torch.randn(size, generator=generator)
            return batch, family.make_noise(config, shape, config.batch_size, generator)

        if models_stacked:
            draws = [one_draw() for _ in range(models_stacked)]
            batch = torch.stack([d[0] for d in draws])
            noise = {k: torch.stack([d[1][k] for d in draws]) for k in draws[0][1]}
        else:
            batch, noise = one_draw()
        pool.append((batch.to(device), to_device(noise, device)))
    return pool


def flops_per_step(model: str, config: Config, shape: tuple, batch: int) -> int:
    """FLOPs of one training step: FlopCounterMode over one eager step of gen's pure
    step (every forward and backward pass it makes, gradient penalties included).

    Counted are matmuls and convolutions (2 FLOPs per multiply-add); elementwise
    work — activations, losses, batch norm and the optimizer's updates — is not,
    as is usual for model FLOPs."""
    family = models.get(MODELS[model][0])
    config = resolve(Config(**{**config.to_dict(), "batch_size": batch}), family.defaults)
    state = family.init(config, shape, 0)
    (x, inputs), = synthetic_inputs(family, config, shape, torch.device("cpu"))[:1]
    step = family.make_step(config, shape)
    with FlopCounterMode(display=False) as counter:
        step(state, x, inputs)
    return counter.get_total_flops()


# --- modes: each a function that advances its own copy of the training state n steps ----


def load_peers():
    """bench/peers.py, found next to the gen package (bench/ is not installed with it); None if absent."""
    if not (PEERS_DIR / "peers.py").exists():
        return None
    if str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))
    import peers
    return peers


def stack_states(states: list[Tree]) -> Tree:
    """N states → one state whose every leaf has a leading model axis of N."""
    first = states[0]
    return {k: stack_states([s[k] for s in states]) if isinstance(v, dict) else torch.stack([s[k] for s in states])
            for k, v in first.items()}


def make_runner(mode: str, model: str, config: Config, shape: tuple, device: torch.device,
                seed: int = 0) -> Callable[[int], None]:
    """`advance(n)`: run n training steps in this mode. The state lives in the closure and is
    replaced (never mutated) each step; nothing is read back to the host."""
    family = models.get(MODELS[model][0])
    if mode == "module":
        peer = load_peers().build(model, config, shape, device)
        pool = [batch for batch, _ in synthetic_inputs(family, config, shape, device, seed)]

        def advance_module(n: int) -> None:
            for index in range(n):
                peer.step(pool[index % POOL])
        return advance_module

    step = family.make_step(config, shape)
    members = int(mode.split("-")[1]) if mode.startswith("vmap-") else 0
    layout = unchanged
    if members:
        state = stack_states([to_device(family.init(config, shape, seed + i), device) for i in range(members)])
        step = compile_step(torch.func.vmap(step), device)
    else:
        state = to_device(family.init(config, shape, seed), device)
        if mode == "compiled-bf16":
            step = autocast_step(step, device)
        if is_compiled(mode):
            # "compiled" returns only the metrics and overwrites `state` in place (gen.optim.donate);
            # on the CPU the state and batches are laid out as gen train lays them out (channels-last
            # convolutions, gen.compilation 6.)
            step, state, layout = compile_for_training(step, state, device, donate=mode in DONATED_MODES,
                                                       mode="reduce-overhead" if mode == "compiled-ro" else None)
    pool = synthetic_inputs(family, config, shape, device, seed, models_stacked=members)
    pool = [(layout(batch), inputs) for batch, inputs in pool]
    if mode == "compiled-ro":
        return cudagraph_runner(step, state, pool)
    if mode in DONATED_MODES:
        return donated_runner(step, state, pool)
    holder, early = {"state": state}, ({}, {})

    def advance(n: int) -> None:
        state = holder["state"]
        for index in range(n):
            batch, inputs = pool[index % POOL]
            state, metrics = step(state, batch, inputs)
            remember(early, metrics)
        holder["state"] = state
    advance.first_step_metrics, advance.second_step_metrics = early
    return advance


def remember(early: tuple[dict, dict], metrics: dict) -> None:
    """Keep copies of the first two steps' metrics in `early` (the first empty dict gets them):
    every gen mode starts from the same state and batches, so the harness checks the compiled
    modes against eager on them; the first step checks the loss, the second the update before
    it, and in the steady modes the first call made straight to the graph (gen.compilation 7.).
    Copies, because a CUDA-graph replay overwrites its outputs on the next call."""
    for kept in early:
        if not kept:
            kept.update({name: value.detach().clone() for name, value in metrics.items()})
            return


def donated_runner(stepped: Callable, state: Tree, pool: list) -> Callable[[int], None]:
    """`advance(n)` for the compiled mode, as gen train runs it: `stepped` (compiled
    gen.optim.donate(step)) overwrites `state` in place each call, the same dict and
    tensors throughout; every call after the very first runs under compilation.steady()."""
    calls, early = {"made": 0}, ({}, {})

    def advance(n: int) -> None:
        index = 0
        if n and not calls["made"]:  # the first call compiles, with guards (nothing to skip yet)
            batch, inputs = pool[0]
            remember(early, stepped(state, batch, inputs))
            index = 1
        with steady():
            for index in range(index, n):
                batch, inputs = pool[index % POOL]
                metrics = stepped(state, batch, inputs)
                if calls["made"] + index == 1:
                    remember(early, metrics)
        calls["made"] += n
    advance.first_step_metrics, advance.second_step_metrics = early
    return advance


def cudagraph_runner(step: Callable, state: Tree, pool: list) -> Callable[[int], None]:
    """`advance(n)` for a step compiled with mode="reduce-overhead" (CUDA graphs).

    A replay writes its outputs into memory that the next replay reuses, and feeding
    those outputs straight back in as the next step's inputs is what has crashed
    (TORCH_NOTES.md; pytorch #160281). So the state lives in fixed buffers, marked
    static so the graph reads them in place instead of copying each one in, and
    after every replay the new state is copied into them with one _foreach_copy_
    — JAX's donation, done by hand. cudagraph_mark_step_begin() before each call
    tells the cudagraph tree that the previous step's outputs are dead."""
    buffers, early = leaves(state), ({}, {})
    for t in buffers:
        torch._dynamo.mark_static_address(t)

    def advance(n: int) -> None:
        for index in range(n):
            batch, inputs = pool[index % POOL]
            torch.compiler.cudagraph_mark_step_begin()
            new_state, metrics = step(state, batch, inputs)
            torch._foreach_copy_(buffers, leaves(new_state))
            remember(early, metrics)
    advance.first_step_metrics, advance.second_step_metrics = early
    return advance


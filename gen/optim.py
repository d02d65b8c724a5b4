"""Optimizers as pairs of pure functions, after optax's GradientTransformation:

    optimizer = adam(1e-3)
    opt_state = optimizer.init(params)
    params, opt_state = optimizer.update(grads, opt_state, params)

State is a dict of tensors (`count` plus one dict per moment), so it is
checkpointed, compiled and vmapped like the params. `update` returns new
tensors and never mutates its inputs. The step count is a 0-d tensor, so a
compiled step that calls `update` sees the same graph every iteration.
"""

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from gen.tree import Params, leaves

OptState = dict  # {"count": Tensor, "mu": Params, ...}
Schedule = Callable[[Tensor], Tensor]  # step count -> learning rate


class Optimizer(NamedTuple):
    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params], tuple[Params, OptState]]


def _learning_rate(lr: float | Schedule, count: Tensor) -> float | Tensor:
    return lr(count) if callable(lr) else lr


def adam(lr: float | Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Adam (Kingma & Ba 2015, Algorithm 1); with weight_decay > 0 it is AdamW
    (Loshchilov & Hutter 2019): the decay multiplies the parameters directly
    instead of entering the gradient, as torch.optim.AdamW does."""

    def init(params: Params) -> OptState:
        # Separate zeros for mu and nu: one shared tensor would alias the two.
        return {
            "count": torch.zeros((), dtype=torch.int64, device=_device(params)),
            "mu": {k: torch.zeros_like(p) for k, p in params.items()},
            "nu": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        count = state["count"] + 1
        t = count.to(torch.float64)
        lr_t = _learning_rate(lr, count)
        # Per-step scalars, in torch.optim.Adam's form (float64, then float32):
        #   step_size = α / (1 - β1^t),   bias_correction2_sqrt = √(1 - β2^t)
        # β^t is written exp(t log β) on purpose. Inductor inlines cheap scalar expressions
        # into every loop that reads them, so `β ** t` became a double-precision pow()
        # per 16 parameters (two per vector, 80k calls per VAE step: 1.5 ms of its Adam
        # kernels on 2 cores); an expression with exp in it that several kernels read is
        # computed once into a buffer instead (measured: the VAE's Adam 1.54 → 0.62 ms).
        step_size = (lr_t / (1 - power(b1, t))).to(torch.float32)
        bias_correction2_sqrt = (1 - power(b2, t)).sqrt().to(torch.float32)
        new_params, mu, nu = {}, {}, {}
        for k, g in grads.items():
            p = params[k]
            if weight_decay:
                p = p * (1 - lr_t * weight_decay)              # decoupled weight decay
            mu[k] = b1 * state["mu"][k] + (1 - b1) * g          # first moment estimate
            nu[k] = b2 * state["nu"][k] + (1 - b2) * g * g      # second moment estimate
            # θ ← θ - α/(1 - β1^t) · m / (√v / √(1 - β2^t) + ε): Algorithm 1's update with the
            # bias corrections folded into the two scalars, one division per parameter.
            denominator = nu[k].sqrt() / bias_correction2_sqrt + eps
            new_params[k] = p - step_size * (mu[k] / denominator)
        return new_params, {"count": count, "mu": mu, "nu": nu}

    return Optimizer(init, update)


def adamw(lr: float | Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    return adam(lr, b1, b2, eps, weight_decay)


def sgd(lr: float | Schedule = 1e-2, momentum: float = 0.0, nesterov: bool = False) -> Optimizer:
    """SGD with heavy-ball momentum, in torch.optim.SGD's form (dampening 0):
    b ← μ b + g;  p ← p - lr · b  (Nesterov: p ← p - lr · (g + μ b))."""

    def init(params: Params) -> OptState:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=_device(params)),
            "momentum": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        count = state["count"] + 1
        lr_t = _learning_rate(lr, count)
        new_params, buffers = {}, {}
        for k, g in grads.items():
            # torch.optim.SGD seeds the buffer with g on the first step; starting
            # from zeros gives b = g on that step as well.
            buffers[k] = momentum * state["momentum"][k] + g
            direction = g + momentum * buffers[k] if nesterov else buffers[k]
            new_params[k] = params[k] - lr_t * direction
        return new_params, {"count": count, "momentum": buffers}

    return Optimizer(init, update)


# --- learning-rate schedules: count (1 on the first update) -> lr, as 0-d tensors so one
# compiled graph serves every step ---------------------------------------------------------


def linear_decay(lr: float, decay_steps: int) -> Schedule:
    """lr_t = lr · (1 - (t - 1) / T): lr on the first update, falling linearly to lr / T at the last."""
    def schedule(count: Tensor) -> Tensor:
        done = (count - 1).clamp(0, decay_steps).to(torch.float32)
        return lr * (1 - done / decay_steps)
    return schedule


def cosine_decay(lr: float, decay_steps: int) -> Schedule:
    """lr_t = lr · ½ (1 + cos(π (t - 1) / T))  (Loshchilov & Hutter 2017, without restarts)."""
    def schedule(count: Tensor) -> Tensor:
        done = (count - 1).clamp(0, decay_steps).to(torch.float32)
        return lr * 0.5 * (1 + torch.cos(torch.pi * done / decay_steps))
    return schedule


def power(base: float, t: Tensor) -> Tensor:
    """base^t for t ≥ 1 as exp(t log base) (see adam); 0 when base = 0 (SNGAN's β1 = 0).
    Also the bias correction of gen.gan's weight average."""
    return torch.exp(t * math.log(base)) if base > 0 else torch.zeros_like(t)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


# --- donation: a pure step that writes its new state into the old one's buffers ------------


def donate(step: Callable) -> Callable:
    """`step(state, *args) -> (new_state, aux)` as `donating_step(state, *args) -> aux`,
    which writes new_state into the tensors of `state`: JAX's donate_argnums, for a
    caller that never needs the old state again (a training loop).

        stepped = torch.compile(optim.donate(step), fullgraph=True, dynamic=False)
        metrics = stepped(state, batch, inputs)      # `state` now holds the next state

    Compiled, AOTAutograd sees the copies as mutations of graph inputs and Inductor
    re-inplaces them: the fused optimizer kernels store the new parameters and moments
    straight into the old storage — no new buffers each step, and the stores hit the
    cache lines the same kernels just read. The numbers are the pure step's, bit for
    bit (tests/test_optim.py). Only aux is returned: handing the 30-odd state tensors
    back out as aliases of the inputs cost about 0.2 ms a call (VAE, 1 thread).

    The contract: the state passed in is overwritten, so snapshots must be cloned
    first; no two leaves may share storage (init keeps mu and nu apart), nor may the
    other arguments share the state's (a batch that is a view of a state tensor read
    the already-updated values under torch.compile: eager 499500, compiled 999000); and an
    exception or Ctrl-C in the middle of a step can leave the state half-updated,
    which a pure step never does."""
    def donating_step(state, *args):
        new_state, aux = step(state, *args)
        old_leaves, new_leaves = leaves(state), leaves(new_state)
        if len(old_leaves) != len(new_leaves):
            raise ValueError("donate: the step returned a state of another structure than it was given")
        for old, new in zip(old_leaves, new_leaves):
            old.copy_(new)
        return aux
    return donating_step


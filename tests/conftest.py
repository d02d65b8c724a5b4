"""Fixtures shared by several test files."""

import pytest
import torch

from gen import optim


@pytest.fixture
def regression_step():
    """A small MLP regression step with Adam, `fresh()` for a new copy of its initial state,
    and three batches: (step, fresh, batches). step(state, x, y) -> (new_state, {"loss"})."""
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(8, 16, generator=g), "b1": torch.zeros(16), "w2": torch.randn(16, 1, generator=g)}
    optimizer = optim.adam(1e-2)

    def loss_fn(params, x, y):
        return ((torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]) - y).pow(2).mean()

    def step(state, x, y):
        loss, grads = torch.func.grad_and_value(loss_fn)(state["params"], x, y)[::-1]
        new_params, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": new_params, "opt_state": opt_state}, {"loss": loss}

    def fresh():
        return {"params": {k: v.clone() for k, v in params.items()}, "opt_state": optimizer.init(params)}
    batches = [(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)) for _ in range(3)]
    return step, fresh, batches

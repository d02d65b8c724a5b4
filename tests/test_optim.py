"""The functional optimizers against torch.optim on identical gradient sequences."""

import pytest
import torch

from gen import optim
from gen.tree import leaves


def run_both(functional, make_torch, steps=25, seed=0, gradient_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_optimizer = make_torch(list(reference.values()))
    state = functional.init(params)
    for _ in range(steps):
        grads = {k: gradient_scale * torch.randn(v.shape, generator=g) for k, v in params.items()}
        params, state = functional.update(grads, state, params)
        for k, p in reference.items():
            p.grad = grads[k].clone()
        torch_optimizer.step()
    return params, reference, state


@pytest.mark.parametrize("functional, make_torch", [
    (optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (optim.adam(3e-3, b1=0.5, b2=0.99, eps=1e-6), lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.5, 0.99), eps=1e-6)),
    (optim.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    (optim.sgd(0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    (optim.sgd(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (optim.sgd(0.05, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
], ids=["adam", "adam-betas", "adamw", "sgd", "sgd-momentum", "sgd-nesterov"])
def test_matches_torch_optim(functional, make_torch):
    params, reference, state = run_both(functional, make_torch)
    for k in params:
        torch.testing.assert_close(params[k], reference[k].detach(), rtol=1e-5, atol=1e-6)
    assert state["count"].item() == 25


def test_adam_adds_eps_after_the_bias_correction():
    """m̂ / (√v̂ + ε) with v̂ = v / (1 - β₂ᵗ): ε outside the correction, as torch.optim.Adam has it. It
    shows where gradients are about as small as ε (inside, early steps would see ε / √(1 - β₂ᵗ))."""
    params, reference, _ = run_both(optim.adam(1e-2, eps=1e-3), lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-3),
                                    steps=5, gradient_scale=1e-3)
    for k in params:
        torch.testing.assert_close(params[k], reference[k].detach(), rtol=1e-5, atol=1e-6)


def test_donate_refuses_a_step_whose_state_changes_shape():
    """A donated step copies each new leaf into the old one; a state that lost a leaf would leave
    that leaf stale, silently, so it is an error."""
    stepped = optim.donate(lambda state: ({"a": state["a"] + 1}, None))
    with pytest.raises(ValueError):
        stepped({"a": torch.zeros(2), "b": torch.zeros(2)})


def test_update_is_pure():
    optimizer = optim.adam(1e-2)
    params = {"w": torch.ones(3)}
    state = optimizer.init(params)
    grads = {"w": torch.full((3,), 0.5)}
    snapshot = (params["w"].clone(), state["mu"]["w"].clone(), state["nu"]["w"].clone())
    new_params, new_state = optimizer.update(grads, state, params)
    assert torch.equal(params["w"], snapshot[0]) and torch.equal(state["mu"]["w"], snapshot[1])
    assert torch.equal(state["nu"]["w"], snapshot[2]) and state["count"].item() == 0
    assert not torch.equal(new_params["w"], params["w"]) and new_state["count"].item() == 1


def test_state_tensors_are_distinct():
    # Dynamo guards on identity and safetensors refuses shared storage.
    state = optim.adam().init({"w": torch.zeros(2)})
    assert state["mu"]["w"].data_ptr() != state["nu"]["w"].data_ptr()


def test_schedule_enters_as_a_function_of_the_step_count():
    seen = []
    optimizer = optim.sgd(lambda count: seen.append(count.item()) or 0.1)
    params, state = {"w": torch.zeros(1)}, None
    state = optimizer.init(params)
    for _ in range(3):
        params, state = optimizer.update({"w": torch.ones(1)}, state, params)
    assert seen == [1, 2, 3]
    torch.testing.assert_close(params["w"], torch.tensor([-0.3]))


def test_donated_step_is_the_pure_step_in_place_one_graph(regression_step):
    # A small MLP regression step with Adam; donation must change where the new state
    # lives, never what it is, and must not add graphs or recompiles.
    step, fresh, batches = regression_step
    torch._dynamo.reset()
    pure, donated = (torch.compile(f, fullgraph=True, dynamic=False) for f in (step, optim.donate(step)))
    expected, state = fresh(), fresh()
    buffers = [t.data_ptr() for t in leaves(state)]
    try:
        for index in range(6):
            expected, expected_metrics = pure(expected, *batches[index % 3])
            metrics = donated(state, *batches[index % 3])
            if index == 0:
                torch.compiler.set_stance("fail_on_recompile")  # raises if a later call compiles again
    finally:
        torch.compiler.set_stance("default")
    assert [t.data_ptr() for t in leaves(state)] == buffers  # written in place
    for got, want in zip(leaves(state), leaves(expected)):
        assert torch.equal(got, want)
    assert torch.equal(metrics["loss"], expected_metrics["loss"]) and state["opt_state"]["count"].item() == 6

"""Configuration checks and learning-rate schedules (gen/config.py, gen/optim.py, gen/models.py)."""

import math

import pytest
import torch

from gen import models, optim
from gen.config import Config, resolve, validate


def lrs(schedule, counts):
    return [float(schedule(torch.tensor(c))) for c in counts]


def test_linear_decay_starts_at_lr_and_falls_to_zero_after_the_run():
    # lr_t = lr (1 - (t-1)/T): 0.1 on update 1, 0.1/T on update T, 0 beyond
    assert lrs(optim.linear_decay(0.1, 4), [1, 2, 3, 4, 5, 9]) == pytest.approx([0.1, 0.075, 0.05, 0.025, 0, 0])


def test_cosine_decay_follows_the_half_cosine():
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs(optim.cosine_decay(0.1, 4), [1, 2, 3, 4, 5, 6, 9]) == pytest.approx(expected + [0, 0], abs=1e-7)


def test_adam_uses_the_scheduled_rate():
    """With a schedule, Adam's first update is lr_1 · sign(g) (bias-corrected m/√v = ±1)."""
    params = {"w": torch.zeros(3)}
    grads = {"w": torch.tensor([1.0, -2.0, 0.5])}
    scheduled = optim.adam(optim.linear_decay(0.2, 10))
    new_params, state = scheduled.update(grads, scheduled.init(params), params)
    assert torch.allclose(new_params["w"], -0.2 * grads["w"].sign(), atol=1e-6)
    # the tenth update runs at lr/10
    state = {**state, "count": torch.tensor(9)}
    stepped, _ = scheduled.update(grads, state, params)
    assert stepped["w"].abs().max() < 0.2 / 10 * 1.01


def test_make_optimizer_builds_the_configured_schedule():
    config = resolve(Config(model="vae", lr_schedule="cosine", decay_steps=100), models.get("vae").defaults)
    assert callable(models.learning_rate(config))
    assert models.learning_rate(resolve(Config(model="vae"), models.get("vae").defaults)) == 1e-3
    with pytest.raises(ValueError, match="needs the run's length"):
        models.learning_rate(Config(model="vae", lr=1e-3, lr_schedule="linear"))


def test_adamw_decays_the_weights_and_adam_does_not():
    """--optimizer adamw is torch.optim.AdamW (decay 1e-2 unless --weight-decay says otherwise); adam has none."""
    defaults = models.get("vae").defaults
    params, grads = {"w": torch.full((3,), 2.0)}, {"w": torch.tensor([1.0, -2.0, 0.5])}
    updated = {}
    for name, config in (("adam", Config(model="vae")), ("adamw", Config(model="vae", optimizer="adamw")),
                         ("adamw 0.5", Config(model="vae", optimizer="adamw", weight_decay=0.5))):
        config = resolve(config, defaults)
        validate(config)
        optimizer = models.make_optimizer(config)
        updated[name] = optimizer.update(grads, optimizer.init(params), params)[0]["w"]
    assert resolve(Config(model="vae", optimizer="adamw"), defaults).weight_decay == 1e-2
    assert resolve(Config(model="vae"), defaults).weight_decay == 0.0
    # first update: θ (1 - lr λ) - lr sign(g), lr = 1e-3
    for name, decay in (("adam", 0.0), ("adamw", 1e-2), ("adamw 0.5", 0.5)):
        expected = params["w"] * (1 - 1e-3 * decay) - 1e-3 * grads["w"].sign()
        assert torch.allclose(updated[name], expected, atol=1e-6), name


def test_config_from_json_refuses_values_of_the_wrong_type():
    assert Config.from_dict({"model": "dcgan", "lr": 1, "unknown": 3}) == Config(model="dcgan", lr=1)
    for values in ({"batch_size": "128"}, {"compile": "yes"}, {"lr": "0.1"}, {"batch_size": True}, {"model": None}):
        with pytest.raises(ValueError, match="the run's config has .* which is not a valid value"):
            Config.from_dict(values)


@pytest.mark.parametrize("config, message", [
    (Config(weight_decay=0.1), "--weight-decay is AdamW's decoupled decay: use it with --optimizer adamw"),
    (Config(optimizer="adamw", weight_decay=-1), "--weight-decay must be non-negative"),
    (Config(lr_schedule="step"), "--lr-schedule must be constant, linear or cosine"),
    (Config(ema_decay=1.0), "--ema-decay must be in [0, 1)"),
    (Config(gan_loss="least-squares"), "--gan-loss must be"),
    (Config(gp_weight=-1), "--gp-weight must be non-negative"),
    (Config(hidden_dim=0), "--hidden-dim must be at least 1"),
    (Config(lr=math.inf), "--lr must be positive and finite"),
    (Config(beta=math.inf), "--beta must be non-negative and finite"),
    (Config(beta=math.nan), "--beta must be non-negative and finite"),
    (Config(optimizer="adamw", weight_decay=math.inf), "--weight-decay must be non-negative and finite"),
    (Config(gp_weight=math.inf), "--gp-weight must be non-negative and finite"),
    # no option sets these; a hand-edited checkpoint's config had blamed the divergence on --lr
    (Config(b1=1.0), "b1 must be in [0, 1)"), (Config(b2=-3.0), "b2 must be in [0, 1)"),
    (Config(b2=math.nan), "b2 must be in"), (Config(optimizer="sgd", momentum=1.5), "momentum must be in"),
    (Config(eval_samples=0), "eval_samples must be between 1 and 2,147,483,647"),
    (Config(eval_samples=-5), "eval_samples must be between"), (Config(eval_samples=10**13), "eval_samples must be"),
    (Config(latent_dim=2**62), "--latent-dim 4611686018427387904 is too large: the most is 2,147,483,647"),
    (Config(iwae_k=2**63 - 1), "--iwae-k 9223372036854775807 is too large"),
    (Config(hidden_dim=2**64), "--hidden-dim 18446744073709551616 is too large"),
    (Config(pack=3, batch_size=64), "--batch-size must be a multiple of --pack"),
    # the edges: a zero rate trains nothing, β₂ = 1 gives Adam NaN at once, μ = 1 never forgets,
    # a schedule over 0 steps divides by 0, and the first size past the most
    (Config(lr=0.0), "--lr must be positive"), (Config(b2=1.0), "b2 must be in [0, 1)"),
    (Config(optimizer="sgd", momentum=1.0), "momentum must be in [0, 1)"),
    (Config(decay_steps=0), "decay_steps must be at least 1"),
    (Config(latent_dim=2**31), "--latent-dim 2147483648 is too large"),
])
def test_invalid_settings_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(config)


def test_the_largest_allowed_settings_pass():
    validate(Config(seed=2**64 - 1, latent_dim=2**31 - 1))  # torch.Generator takes seeds up to 2^64 - 1
    validate(Config(seed=-2**63))


def test_adam_with_zero_first_moment_decay_matches_torch():
    """β1 = 0 (SNGAN's and WGAN-GP's usual Adam) must not trip on log(0)."""
    params = {"w": torch.tensor([1.0, -2.0])}
    grads = {"w": torch.tensor([0.5, 0.25])}
    adam = optim.adam(2e-4, 0.0, 0.9)
    new_params, _ = adam.update(grads, adam.init(params), params)
    reference = params["w"].clone().requires_grad_()
    torch_adam = torch.optim.Adam([reference], lr=2e-4, betas=(0.0, 0.9))
    reference.grad = grads["w"].clone()
    torch_adam.step()
    assert torch.allclose(new_params["w"], reference.detach(), atol=1e-7)

"""Every setting a run records reaches what it controls: the families' documented defaults, each
--gan-loss, --gp-weight, --lr-schedule and --optimizer, the VAE's test loss whatever β, and the
toy data sets' shapes. (A setting silently replaced by a constant would train something else.)"""

import math

import pytest
import torch

from gen import data, gan, models, vae
from gen.config import Config, resolve
from gen.tree import take


def resolved(name: str, **overrides) -> Config:
    overrides.setdefault("decay_steps", 100)
    return resolve(Config(model=name, **overrides), models.get(name).defaults)


@pytest.mark.parametrize("model, expected", [
    # README "Models": DCGAN's Adam(2e-4, β1 = 0.5), batch 64, latent 100; WGAN-GP's Adam(1e-4, 0.5, 0.9)
    # with 5 critic updates; SNGAN's hinge loss, Adam(1e-3, 0, 0.9), batch 512, linear decay, EMA 0.999.
    ("dcgan", {"lr": 2e-4, "b1": 0.5, "b2": 0.999, "batch_size": 64, "latent_dim": 100, "gan_loss": "non-saturating"}),
    ("wgan-gp", {"lr": 1e-4, "b1": 0.5, "b2": 0.9, "n_critic": 5, "gan_loss": "wasserstein", "gp_weight": 10.0}),
    ("sngan", {"lr": 1e-3, "b1": 0.0, "b2": 0.9, "batch_size": 512, "gan_loss": "hinge", "lr_schedule": "linear",
               "ema_decay": 0.999}),
    ("gan", {"lr": 1e-3, "b1": 0.5, "batch_size": 256, "latent_dim": 8, "hidden_dim": 128, "n_critic": 1,
             "gan_loss": "non-saturating"}),
    ("vae", {"lr": 1e-3, "batch_size": 128, "latent_dim": 20, "hidden_dim": 400}),
])
def test_family_defaults_are_the_documented_ones(model, expected):
    config = resolved(model)
    assert {name: getattr(config, name) for name in expected} == expected


def test_digits_train_for_a_hundred_epochs_by_default():
    from gen import train
    assert data.load("digits").default_epochs == 100
    assert train.prepare(Config(model="vae", data="digits"))[0].epochs == 100
    assert train.prepare(Config(model="dcgan", data="digits"))[0].epochs == 100


@pytest.mark.parametrize("model, epochs", [("vae", 10), ("dcgan", 5), ("gan", 50), ("wgan-gp", 10), ("sngan", 110)])
def test_default_run_lengths_are_the_documented_ones(model, epochs):
    assert models.get(model).defaults["epochs"] == epochs  # README "Models"; on digits 100 instead


A = 0.7  # a logit, or a critic's score


@pytest.mark.parametrize("name, d_loss, g_loss", [
    # (real logit A, fake logit -A) -> D's loss; fake logit A -> G's loss, from each paper's formula
    ("minimax", -math.log(1 / (1 + math.exp(-A))) - math.log(1 - 1 / (1 + math.exp(A))),
     math.log(1 - 1 / (1 + math.exp(-A)))),                                          # log(1 - σ(a))
    ("non-saturating", -math.log(1 / (1 + math.exp(-A))) - math.log(1 - 1 / (1 + math.exp(A))),
     -math.log(1 / (1 + math.exp(-A)))),                                             # -log σ(a)
    ("wasserstein", -A - A, -A),                                                     # f(fake) - f(real); -f(fake)
    ("hinge", max(0, 1 - A) + max(0, 1 - A), -A),                                    # relu(1 - r) + relu(1 + f); -f
])
def test_each_gan_loss_name_selects_its_pair(name, d_loss, g_loss):
    discriminator_loss, generator_loss = gan.LOSSES[name]
    assert float(discriminator_loss(torch.tensor([A]), torch.tensor([-A])).mean()) == pytest.approx(d_loss, rel=1e-6)
    assert float(generator_loss(torch.tensor([A])).mean()) == pytest.approx(g_loss, rel=1e-6)


def test_gp_weight_scales_the_critics_penalty():
    """λ = 0 trains the critic without the penalty: its update differs from λ = 10's, which
    differs from λ = 20's (SGD, whose step follows the gradient's size, as Adam's first does not)."""
    shape, batch = (2,), 8
    updated = []
    for weight in (0.0, 10.0, 20.0):
        config = resolved("wgan-gp", hidden_dim=16, batch_size=batch, n_critic=1, gp_weight=weight, optimizer="sgd")
        generator = torch.Generator().manual_seed(0)
        inputs = gan.make_noise(config, shape, batch, generator)
        real = torch.randn(1, batch, *shape, generator=generator)
        state, _ = gan.make_step(config, shape)(gan.init(config, shape, 0), real, inputs)
        updated.append(state["params"]["discriminator.output.weight"])
    assert not torch.equal(updated[0], updated[1])
    # SGD's step is linear in the gradient, and the gradient in λ: λ = 20 moves twice as far as λ = 10.
    torch.testing.assert_close(updated[2] - updated[0], 2 * (updated[1] - updated[0]), rtol=1e-4, atol=1e-7)


def test_gp_weight_zero_leaves_only_the_wasserstein_loss():
    """λ = 0 is the critic's plain Wasserstein loss E[f(G(z))] - E[f(x)], no penalty left over: the
    update is SGD's first step p - lr ∇L computed here from the networks directly. (The linearity
    test above cannot tell λ from λ + 1.)"""
    shape, batch = (2,), 8
    config = resolved("wgan-gp", hidden_dim=16, batch_size=batch, n_critic=1, gp_weight=0.0, optimizer="sgd")
    generator = torch.Generator().manual_seed(0)
    inputs = gan.make_noise(config, shape, batch, generator)
    real = torch.randn(1, batch, *shape, generator=generator)
    state = gan.init(config, shape, 0)
    updated, _ = gan.make_step(config, shape)(state, real, inputs)

    apply_generator, apply_discriminator = gan.networks(config, shape)
    params, model_state = state["params"], state.get("model_state", {})
    g_params, d_params = take(params, "generator"), take(params, "discriminator")
    fake, _ = apply_generator(g_params, take(model_state, "generator"), inputs["z_discriminator"][0], True)

    def critic_loss(d):
        real_scores, _ = apply_discriminator(d, take(model_state, "discriminator"), real[0], True)
        fake_scores, _ = apply_discriminator(d, take(model_state, "discriminator"), fake, True)
        return fake_scores.mean() - real_scores.mean()

    gradient = torch.func.grad(critic_loss)(d_params)
    for name in ("output.weight", "output.bias"):
        torch.testing.assert_close(updated["params"][f"discriminator.{name}"],
                                   d_params[name] - config.lr * gradient[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("schedule, expected", [
    ("linear", 1 - 25 / 100),                               # lr (1 - (t - 1) / T) at t = 26
    ("cosine", 0.5 * (1 + math.cos(math.pi * 25 / 100))),  # lr ½ (1 + cos(π (t - 1) / T))
])
def test_lr_schedule_names_select_their_decay(schedule, expected):
    config = Config(lr=1.0, lr_schedule=schedule, decay_steps=100)
    assert float(models.learning_rate(config)(torch.tensor(26))) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("optimizer, expected", [
    ("sgd", 1.0 - 0.1 * 2.0),   # p - lr g (momentum's buffer starts at g)
    ("adam", 1.0 - 0.1),        # Adam's first step: p - lr g / |g|
    ("adamw", 1.0 - 0.1 - 0.1 * 0.01 * 1.0),  # and decoupled decay lr λ p
])
def test_optimizer_names_select_their_update(optimizer, expected):
    config = resolve(Config(optimizer=optimizer, lr=0.1, b1=0.9, b2=0.999), {})
    chosen = models.make_optimizer(config)
    params = {"w": torch.tensor([1.0])}
    new_params, _ = chosen.update({"w": torch.tensor([2.0])}, chosen.init(params), params)
    assert float(new_params["w"]) == pytest.approx(expected, rel=1e-5)


def test_sgd_uses_the_configured_momentum():
    """Two steps with gradient 2: the second moves by lr (μ g + g), so momentum shows (the first
    step's buffer is g whatever μ is)."""
    config = resolve(Config(optimizer="sgd", lr=0.1, momentum=0.9), {})
    chosen = models.make_optimizer(config)
    params, gradient = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    state = chosen.init(params)
    for _ in range(2):
        params, state = chosen.update(gradient, state, params)
    assert float(params["w"]) == pytest.approx(1.0 - 0.1 * 2.0 - 0.1 * (0.9 * 2.0 + 2.0), rel=1e-5)


def test_the_vae_test_loss_is_the_negative_elbo_whatever_beta_trains():
    """β weights the KL term in training only; the reported test loss is the β = 1 bound."""
    dataset = data.load("digits")
    losses = []
    for beta in (1.0, 0.0, 4.0):
        config = resolved("vae", beta=beta)
        state = vae.init(config, dataset.shape, 0)
        losses.append(vae.evaluate(state, config, dataset, seed=0)["test_loss"])
    assert losses[0] == losses[1] == losses[2]


def test_moons_and_swissroll_have_their_shapes():
    moons = data.load("moons").train
    # Two unit half circles, centred at (0, 0) and (1, 0.5), with noise 0.05.
    off_arcs = torch.minimum((moons.norm(dim=1) - 1).abs(), ((moons - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs())
    assert (off_arcs < 0.25).float().mean() > 0.999
    upper = ((moons.norm(dim=1) - 1).abs() < 0.25) & (moons[:, 1] > -0.25)
    assert 0.45 < upper.float().mean() < 0.55  # both moons, half the points each
    roll = data.load("swissroll").train
    # (t cos t, t sin t) / 5 for t in [1.5π, 4.5π]: radii t / 5 in [0.94, 2.83], noise 0.05.
    radius = roll.norm(dim=1)
    assert ((radius > 0.94 - 0.25) & (radius < 2.83 + 0.25)).float().mean() > 0.999
    assert radius.min() < 1.1 and radius.max() > 2.7  # the whole spiral, not a part of it
    # On the spiral a point's angle is its t = 5 r (mod 2π); rings at the same radii would not be.
    angle_off = torch.remainder(torch.atan2(roll[:, 1], roll[:, 0]) - 5 * radius + math.pi, 2 * math.pi) - math.pi
    assert (angle_off.abs() < 1.2).float().mean() > 0.999 and angle_off.abs().median() < 0.3  # σ 0.05 in r is 0.25 in t

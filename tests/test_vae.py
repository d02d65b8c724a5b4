"""VAE losses against closed forms, torch.distributions and the pytorch/examples module."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.distributions import Bernoulli, Normal, kl_divergence

from gen import data, models, vae
from gen.config import Config, resolve


def config_for(model="vae", **overrides):
    return resolve(Config(model=model, **overrides), models.get(model).defaults)


def test_gaussian_kl_matches_torch_distributions():
    mean, log_variance = torch.randn(5, 7), torch.randn(5, 7)
    q = Normal(mean, torch.exp(0.5 * log_variance))
    p = Normal(torch.zeros(5, 7), torch.ones(5, 7))
    torch.testing.assert_close(vae.gaussian_kl(mean, log_variance), kl_divergence(q, p).sum(-1))


def test_log_densities_match_torch_distributions():
    z, mean, log_variance = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    expected = Normal(mean, torch.exp(0.5 * log_variance)).log_prob(z).sum(-1)
    torch.testing.assert_close(vae.gaussian_log_density(z, mean, log_variance), expected)
    logits, x = torch.randn(4, 1, 2, 2), torch.randint(0, 2, (4, 1, 2, 2)).float()
    torch.testing.assert_close(vae.bernoulli_log_likelihood(logits, x),
                               Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3)))


def test_bernoulli_log_likelihood_and_its_gradient_hold_at_zero_and_at_extreme_logits():
    """The gradient is x - σ(l) everywhere: at l = 0 too, where a max(l, 0) written as relu would
    give x, and for logits far past where e^l overflows."""
    logits = torch.tensor([[0.0, 0.0, 3.0, -3.0, 80.0, -80.0, 1e30, -1e30]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 0.25, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    value = vae.bernoulli_log_likelihood(logits, x)
    gradient, = torch.autograd.grad(value.sum(), logits)
    torch.testing.assert_close(gradient, x - torch.sigmoid(logits))
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    torch.testing.assert_close(value, expected)


class ExamplesVAE(tnn.Module):
    """pytorch/examples vae/main.py, with the noise passed in instead of drawn."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = tnn.Linear(784, 400), tnn.Linear(400, 20), tnn.Linear(400, 20)
        self.fc3, self.fc4 = tnn.Linear(20, 400), tnn.Linear(400, 784)

    def forward(self, x, eps):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + eps * torch.exp(0.5 * logvar)
        recon = torch.sigmoid(self.fc4(F.relu(self.fc3(z))))
        bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld


NAME_MAP = {"fc1": "encoder.hidden", "fc21": "encoder.mean", "fc22": "encoder.log_variance",
            "fc3": "decoder.hidden", "fc4": "decoder.output"}


def test_mlp_vae_loss_and_gradients_match_pytorch_examples_module():
    config = config_for("vae")
    state = vae.init(config, (1, 28, 28), seed=0)
    params = state["params"]
    module = ExamplesVAE()
    module.load_state_dict({f"{old}.{p}": params[f"{new}.{p}"] for old, new in NAME_MAP.items()
                            for p in ("weight", "bias")})
    x, eps = torch.rand(16, 1, 28, 28), torch.randn(16, 20)
    reference = module(x, eps)
    loss = vae.objective(config, (1, 28, 28))(params, x, eps)["loss"].sum()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
    reference.backward()
    grads = torch.func.grad(lambda p: vae.objective(config, (1, 28, 28))(p, x, eps)["loss"].sum())(params)
    torch.testing.assert_close(grads["encoder.hidden.weight"], module.fc1.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["decoder.output.bias"], module.fc4.bias.grad, rtol=1e-4, atol=1e-4)


def test_mlp_vae_has_the_pytorch_examples_parameter_count():
    state = vae.init(config_for("vae"), (1, 28, 28), seed=0)
    assert sum(p.numel() for p in state["params"].values()) == sum(p.numel() for p in ExamplesVAE().parameters())


def test_beta_scales_only_the_kl_term():
    config, shape = config_for("vae"), (1, 8, 8)
    params = vae.init(config, shape, 0)["params"]
    x, eps = torch.rand(4, *shape), torch.randn(4, 20)
    plain = vae.objective(config, shape)(params, x, eps)
    weighted = vae.objective(config_for("vae", beta=4.0), shape)(params, x, eps)
    torch.testing.assert_close(weighted["loss"], plain["reconstruction"] + 4.0 * plain["kl"])


def test_iwae_matches_a_loop_over_samples_and_is_the_elbo_at_k1():
    config, shape = config_for("vae", iwae_k=5), (1, 8, 8)
    params = vae.init(config, shape, 0)["params"]
    x, eps = torch.rand(3, *shape).round(), torch.randn(5, 3, 20)
    bound = vae.objective(config, shape)(params, x, eps)["loss"]
    # Independent computation with torch.distributions, one sample at a time.
    mean, log_variance = vae.mlp_encode(params, x)
    q = Normal(mean, torch.exp(0.5 * log_variance))
    log_weights = []
    for eps_i in eps:
        z = mean + torch.exp(0.5 * log_variance) * eps_i
        logits = vae.mlp_decode(params, z, shape)
        log_weights.append(Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
                           + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
    expected = -(torch.logsumexp(torch.stack(log_weights), 0) - math.log(5))
    torch.testing.assert_close(bound, expected, rtol=1e-5, atol=1e-4)
    # k = 1: the bound is the single-sample ELBO with a Monte Carlo KL estimate.
    one = vae.negative_iwae_bound(vae.mlp_encode, lambda p, z: vae.mlp_decode(p, z, shape), params, x, eps[:1])
    torch.testing.assert_close(one["loss"], -log_weights[0])


def test_iwae_bound_tightens_with_k():
    config, shape = config_for("vae"), (1, 8, 8)
    params = vae.init(config, shape, 0)["params"]
    # 512 seeded images: with 64 from the global RNG the k=10 and k=100 bounds (0.04 nats apart)
    # came out in the wrong order for some draws; 512 kept them ordered over 40 seeds here.
    x = torch.rand(512, *shape, generator=torch.Generator().manual_seed(1))
    decode = lambda p, z: vae.mlp_decode(p, z, shape)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    losses = [vae.negative_iwae_bound(vae.mlp_encode, decode, params, x, torch.randn(k, 512, 20, generator=g))
              ["loss"].mean().item() for k in (1, 10, 100)]
    assert losses[0] > losses[1] > losses[2]  # -L_1 >= -L_10 >= -L_100 on average


def test_evaluate_averages_both_bounds_over_the_whole_test_set():
    """The test metrics are per-image means over every test image, whatever the evaluation batch
    (297 digits in batches of 100, the last one ragged): the β = 1 ELBO with one ε per image, and
    the IWAE bound with the run's k samples, drawn in that order from the evaluation seed."""
    dataset = data.load("digits")
    config = config_for("vae", iwae_k=4, beta=3.0, hidden_dim=32, latent_dim=4)
    params = vae.init(config, dataset.shape, 0)["params"]
    results = vae.evaluate({"params": params}, config, dataset, seed=3, batch_size=100)
    elbo = vae.objective(config_for("vae", hidden_dim=32, latent_dim=4), dataset.shape)  # β = 1, k = 1
    iwae = vae.objective(config, dataset.shape)
    generator = torch.Generator().manual_seed(3)
    totals = dict.fromkeys(("test_loss", "test_reconstruction", "test_kl", "test_iwae_loss"), 0.0)
    for x in dataset.test.split(100):
        terms = elbo(params, x, torch.randn(len(x), 4, generator=generator))
        for name in ("loss", "reconstruction", "kl"):
            totals[f"test_{name}"] += terms[name].sum().item()
        totals["test_iwae_loss"] += iwae(params, x, torch.randn(4, len(x), 4, generator=generator))["loss"].sum().item()
    assert results == pytest.approx({name: total / 297 for name, total in totals.items()}, rel=1e-6)
    assert results["test_loss"] == pytest.approx(results["test_reconstruction"] + results["test_kl"], rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_conv_vae_shapes(shape):
    config = config_for("conv-vae")
    params = vae.init(config, shape, 0)["params"]
    mean, log_variance = vae.conv_encode(params, torch.rand(3, *shape))
    assert mean.shape == log_variance.shape == (3, 20)
    assert vae.conv_decode(params, mean, shape).shape == (3, *shape)


@pytest.mark.parametrize("model", ["vae", "conv-vae"])
def test_training_steps_lower_the_loss(model):
    config, shape = config_for(model, lr=3e-3), (1, 8, 8)
    state = vae.init(config, shape, 0)
    step = vae.make_step(config, shape)
    patterns = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1)).round()
    x = patterns.repeat(8, 1, 1, 1)  # 4 images to learn: the loss can fall far below random data's 64 ln 2
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        state, metrics = step(state, x, vae.make_noise(config, shape, 32, g))
        losses.append(metrics["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_noise_shapes_follow_k():
    g = torch.Generator().manual_seed(0)
    assert vae.make_noise(config_for("vae"), (1, 8, 8), 7, g)["eps"].shape == (7, 20)
    assert vae.make_noise(config_for("vae", iwae_k=3), (1, 8, 8), 7, g)["eps"].shape == (3, 7, 20)


@pytest.mark.parametrize("log_variance", [-30.0, -100.0])
def test_iwae_log_weight_is_exact_for_tiny_posterior_variances(log_variance):
    # z = μ + σε, so log q(z|x) = log N(ε; 0, I) - ½ Σ log σ². Written with (z - μ)² / σ² instead,
    # float32 rounds z - μ to 0 once σ ≪ ulp(μ) (the log-weight lost ½ Σ ε²), and exp(-log σ²)
    # overflows below log σ² ≈ -88 (0 · inf: NaN), while the ELBO of the same encoder stays finite.
    g = torch.Generator().manual_seed(0)
    mean, eps = torch.randn(3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    weight = torch.randn(4, 6, generator=g)
    log_var = torch.full((3, 4), log_variance)
    x = torch.rand(3, 6, generator=g).round()
    encode, decode = (lambda p, x: (mean, log_var)), (lambda p, z: z @ weight)
    loss = vae.negative_iwae_bound(encode, decode, {}, x, eps)["loss"]
    # Reference in float64, log q from ε directly.
    z = mean.double() + torch.exp(0.5 * log_var.double()) * eps[0].double()
    log_q = Normal(0.0, 1.0).log_prob(eps[0].double()).sum(-1) - 0.5 * log_var.double().sum(-1)
    log_weight = (Bernoulli(logits=z @ weight.double()).log_prob(x.double()).sum(-1)
                  + Normal(0.0, 1.0).log_prob(z).sum(-1) - log_q)
    torch.testing.assert_close(loss.double(), -log_weight, rtol=1e-5, atol=1e-4)


def test_losses_keep_float32_accuracy_under_bf16_autocast():
    # `--precision bf16` runs the step under autocast: the encoder's and decoder's outputs come out
    # bfloat16. The losses built on them must still be computed in float32 (CPU autocast leaves exp
    # and sum in bf16, and inside vmap BCE-with-logits decomposes into bf16 elementwise ops), else
    # the KL rounds to bf16's 3 digits and IWAE's log-weights are off by tenths of a nat.
    g = torch.Generator().manual_seed(0)
    mean, log_var = (3 * torch.randn(4, 20, generator=g)).bfloat16(), torch.randn(4, 20, generator=g).bfloat16()
    x, eps = torch.rand(4, 800, generator=g).round(), torch.randn(3, 4, 20, generator=g)
    logits = (4 * torch.randn(4, 800, generator=g)).bfloat16()
    encode = lambda p, x: (mean, log_var)                                         # noqa: E731
    # bf16 logits that are batched under vmap (+ 0·z, exact) and do not hinge on how z rounds.
    decode = lambda p, z: logits + (0 * z).tile(40).to(torch.bfloat16)            # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        elbo = vae.negative_elbo(encode, decode, {}, x, eps[0])
        iwae = vae.negative_iwae_bound(encode, decode, {}, x, eps)["loss"]
    # Float64 references on the same bfloat16 values.
    m, lv, x64 = mean.double(), log_var.double(), x.double()
    q = Normal(m, torch.exp(0.5 * lv))
    kl = kl_divergence(q, Normal(torch.zeros_like(m), torch.ones_like(m))).sum(-1)
    zs = m + torch.exp(0.5 * lv) * eps.double()                                     # (k, B, 20)
    log_weights = (Bernoulli(logits=logits.double()).log_prob(x64).sum(-1)
                   + Normal(0.0, 1.0).log_prob(zs).sum(-1) - q.log_prob(zs).sum(-1))
    expected_iwae = -(torch.logsumexp(log_weights, 0) - math.log(3))
    torch.testing.assert_close(elbo["kl"].double(), kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(iwae.double(), expected_iwae, rtol=1e-5, atol=1e-3)

"""Variational autoencoders: an MLP VAE (the pytorch/examples architecture), a
convolutional VAE, β-VAE weighting and the importance-weighted bound (IWAE).

Encoder q(z|x) = N(μ(x), diag σ²(x)), prior p(z) = N(0, I), decoder
p(x|z) = Bernoulli(sigmoid(logits(z))) per pixel. Every loss is per example,
in nats, summed over pixels (as pytorch/examples reports it), and the training
step minimises its batch mean.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad_and_value, vmap

from gen import nn
from gen.config import Config
from gen.data import Dataset
from gen.models import Family, make_optimizer
from gen.tree import Params, Tree, take, with_prefix

# --- probabilistic pieces ------------------------------------------------------------


def gaussian_sample(mean: Tensor, log_variance: Tensor, eps: Tensor) -> Tensor:
    """Reparameterisation (Kingma & Welling 2014, §2.4): z = μ + σ ⊙ ε, ε ~ N(0, I)."""
    return mean + torch.exp(0.5 * log_variance) * eps


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = -½ Σ_j (1 + log σ_j² - μ_j² - σ_j²)  (VAE paper, Appendix B), per example."""
    return -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum(1)  # (B,)


def gaussian_log_density(z: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """log N(z; μ, σ²) = -½ Σ_j (log 2π + log σ_j² + (z_j - μ_j)² / σ_j²), per example."""
    terms = math.log(2 * math.pi) + log_variance + (z - mean).pow(2) * torch.exp(-log_variance)
    return -0.5 * terms.sum(1)  # (B,)


def bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) = Σ_i x_i log p_i + (1 - x_i) log(1 - p_i), p = σ(l): minus the summed BCE.

    With log p = l - softplus(l) and log(1 - p) = -softplus(l) each term is x l - softplus(l),
    and softplus(l) = (l + |l|)/2 + log(1 + e^(-|l|)) never overflows, so

        log p(x_i|z) = (x_i - ½) l_i - |l_i|/2 - log1p(e^(-|l_i|)).

    Written out rather than as F.binary_cross_entropy_with_logits, whose decomposition takes
    two exponentials and a log per pixel where this takes one of each (its gradient x - σ(l)
    reuses e^(-|l|)): VAE b512 on the CPU, the loss's forward and gradient compiled, 0.89 ->
    0.56 ms. max(l, 0) is (l + |l|)/2 so that the gradient at l = 0 is x - ½: with relu's 0
    there (and |l|'s), it would be x."""
    logits = nn.at_least_float32(logits)
    magnitude = logits.abs()
    terms = (x - 0.5) * logits - 0.5 * magnitude - torch.log1p(torch.exp(-magnitude))
    return terms.flatten(1).sum(1)  # (B,)


# --- architectures -------------------------------------------------------------------


def mlp_init(generator: torch.Generator, input_dim: int, hidden_dim: int, latent_dim: int) -> Params:
    """pytorch/examples' VAE: 784-400-(20, 20) encoder, 20-400-784 decoder, ReLU."""
    return {
        **with_prefix("encoder.hidden", nn.linear_init(generator, input_dim, hidden_dim)),
        **with_prefix("encoder.mean", nn.linear_init(generator, hidden_dim, latent_dim)),
        **with_prefix("encoder.log_variance", nn.linear_init(generator, hidden_dim, latent_dim)),
        **with_prefix("decoder.hidden", nn.linear_init(generator, latent_dim, hidden_dim)),
        **with_prefix("decoder.output", nn.linear_init(generator, hidden_dim, input_dim)),
    }


def gaussian_heads(params: Params, h: Tensor) -> tuple[Tensor, Tensor]:
    """(μ, log σ²) = h [W_μ; W_logσ²]ᵀ + [b_μ; b_logσ²], split in two: one (B, 2d) matmul
    instead of two (B, d) ones.

    The params keep pytorch/examples' two layers (fc21, fc22: `encoder.mean`,
    `encoder.log_variance`); the concatenation is inside the step, so its
    backward is a split and the gradients land on the two weights as before.
    Forward and backward then make 3 small matmul calls fewer per step."""
    mean, log_variance = take(params, "encoder.mean"), take(params, "encoder.log_variance")
    weight = torch.cat([mean["weight"], log_variance["weight"]])          # (2d, hidden)
    bias = torch.cat([mean["bias"], log_variance["bias"]])                # (2d,)
    return F.linear(h, weight, bias).chunk(2, dim=-1)


def mlp_encode(params: Params, x: Tensor) -> tuple[Tensor, Tensor]:
    h = F.relu(nn.linear(take(params, "encoder.hidden"), x.flatten(1)))
    return gaussian_heads(params, h)


def mlp_decode(params: Params, z: Tensor, shape: tuple) -> Tensor:
    h = F.relu(nn.linear(take(params, "decoder.hidden"), z))
    return nn.linear(take(params, "decoder.output"), h).reshape(len(z), *shape)  # logits


def conv_init(generator: torch.Generator, shape: tuple, hidden_dim: int, latent_dim: int) -> Params:
    """Two stride-2 convolutions (H → H/4), a hidden layer, and the mirror image to decode."""
    channels, height, width = shape
    flat = 64 * (height // 4) * (width // 4)
    return {
        **with_prefix("encoder.conv1", nn.conv2d_init(generator, channels, 32, 4)),
        **with_prefix("encoder.conv2", nn.conv2d_init(generator, 32, 64, 4)),
        **with_prefix("encoder.hidden", nn.linear_init(generator, flat, hidden_dim)),
        **with_prefix("encoder.mean", nn.linear_init(generator, hidden_dim, latent_dim)),
        **with_prefix("encoder.log_variance", nn.linear_init(generator, hidden_dim, latent_dim)),
        **with_prefix("decoder.hidden", nn.linear_init(generator, latent_dim, hidden_dim)),
        **with_prefix("decoder.expand", nn.linear_init(generator, hidden_dim, flat)),
        **with_prefix("decoder.deconv1", nn.conv_transpose2d_init(generator, 64, 32, 4)),
        **with_prefix("decoder.deconv2", nn.conv_transpose2d_init(generator, 32, channels, 4)),
    }


def conv_encode(params: Params, x: Tensor) -> tuple[Tensor, Tensor]:
    # The first convolution and the decoder's last (one image channel) as matmuls on the CPU: faster
    # than oneDNN's direct convolution with one channel, same params (gen.nn.image_conv2d, bench/README.md).
    h = F.relu(nn.image_conv2d(take(params, "encoder.conv1"), x, stride=2, padding=1))  # (B, 32, H/2, W/2)
    h = F.relu(nn.conv2d(take(params, "encoder.conv2"), h, stride=2, padding=1))   # (B, 64, H/4, W/4)
    h = F.relu(nn.linear(take(params, "encoder.hidden"), h.flatten(1)))
    return gaussian_heads(params, h)


def conv_decode(params: Params, z: Tensor, shape: tuple) -> Tensor:
    _, height, width = shape
    h = F.relu(nn.linear(take(params, "decoder.hidden"), z))
    h = F.relu(nn.linear(take(params, "decoder.expand"), h))
    h = h.unflatten(1, (64, height // 4, width // 4))                               # (B, 64, H/4, W/4)
    h = F.relu(nn.conv_transpose2d(take(params, "decoder.deconv1"), h, stride=2, padding=1))
    return nn.image_conv_transpose2d(take(params, "decoder.deconv2"), h, stride=2, padding=1)  # logits (B, C, H, W)


# --- objectives ----------------------------------------------------------------------


def negative_elbo(encode, decode, params: Params, x: Tensor, eps: Tensor, beta: float = 1.0) -> dict:
    """-ELBO(x) = -E_q[log p(x|z)] + β KL(q(z|x) ‖ p(z))  (β = 1: Kingma & Welling; β > 1: Higgins et al.).

    One sample z = μ + σε estimates the reconstruction term; the KL is exact.
    Returns per-example tensors."""
    mean, log_variance = map(nn.at_least_float32, encode(params, x))
    logits = decode(params, gaussian_sample(mean, log_variance, eps))
    reconstruction = -bernoulli_log_likelihood(logits, x)
    kl = gaussian_kl(mean, log_variance)
    return {"loss": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl}


def negative_iwae_bound(encode, decode, params: Params, x: Tensor, eps: Tensor) -> dict:
    """-L_k(x) = -log (1/k) Σ_i w_i,  w_i = p(x|z_i) p(z_i) / q(z_i|x),  z_i ~ q(z|x)  (Burda et al. 2016, eq. 8).

    eps is (k, B, latent); the k log-weights come from one `vmap` over it.
    L_1 is the ELBO and L_k rises towards log p(x) as k grows."""
    mean, log_variance = map(nn.at_least_float32, encode(params, x))

    def log_weight(eps_i: Tensor) -> Tensor:
        z = gaussian_sample(mean, log_variance, eps_i)
        zeros = torch.zeros_like(z)
        log_prior = gaussian_log_density(z, zeros, zeros)
        # log q(z|x) = log N(ε; 0, I) - ½ Σ_j log σ_j², since (z - μ)/σ = ε: exact, where
        # gaussian_log_density(z, μ, log σ²) loses ε once σ ≪ ulp(μ) (z - μ rounds to 0) and
        # gives 0 · inf = NaN below log σ² ≈ -88 (exp(-log σ²) overflows). Same value and gradient.
        log_posterior = gaussian_log_density(eps_i, zeros, zeros) - 0.5 * log_variance.sum(1)
        return bernoulli_log_likelihood(decode(params, z), x) + log_prior - log_posterior

    log_weights = vmap(log_weight)(eps)                                # (k, B)
    bound = torch.logsumexp(log_weights, dim=0) - math.log(len(eps))  # log-mean-exp over the k samples
    return {"loss": -bound}


def objective(config: Config, shape: tuple):
    """The per-example loss the config asks for, as f(params, x, eps) -> dict of (B,) tensors."""
    encode, decode = ARCHITECTURES[config.model][1:]
    decode = partial(decode, shape=shape)
    if config.iwae_k > 1:
        return partial(negative_iwae_bound, encode, decode)
    return partial(negative_elbo, encode, decode, beta=config.beta)


# --- the family: init, step, noise, sampling, evaluation -----------------------------


def init(config: Config, shape: tuple, seed: int) -> Tree:
    generator = torch.Generator().manual_seed(seed)
    if config.model == "vae":
        params = mlp_init(generator, math.prod(shape), config.hidden_dim, config.latent_dim)
    else:
        params = conv_init(generator, shape, config.hidden_dim, config.latent_dim)
    return {"params": params, "opt_state": make_optimizer(config).init(params)}


def make_step(config: Config, shape: tuple):
    optimizer = make_optimizer(config)
    per_example = objective(config, shape)

    def loss_fn(params: Params, x: Tensor, eps: Tensor):
        terms = per_example(params, x, eps)
        metrics = {name: value.mean() for name, value in terms.items()}
        return metrics["loss"], metrics

    def step(state: Tree, batch: Tensor, inputs: dict[str, Tensor]) -> tuple[Tree, dict[str, Tensor]]:
        grads, (_, metrics) = grad_and_value(loss_fn, has_aux=True)(state["params"], batch, inputs["eps"])
        params, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": params, "opt_state": opt_state}, metrics

    return step


def make_noise(config: Config, shape: tuple, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """ε for the reparameterisation: (B, latent) for the ELBO, (k, B, latent) for IWAE."""
    leading = (config.iwae_k,) if config.iwae_k > 1 else ()
    return {"eps": torch.randn(*leading, batch_size, config.latent_dim, generator=generator)}


def generate(state: Tree, config: Config, shape: tuple, n: int, generator: torch.Generator) -> Tensor:
    """Decoder means sigmoid(logits(z)) for z ~ N(0, I): images in [0, 1]."""
    params = state["params"]
    device = next(iter(params.values())).device
    z = torch.randn(n, config.latent_dim, generator=generator).to(device)
    decode = ARCHITECTURES[config.model][2]
    with torch.no_grad():
        return torch.sigmoid(decode(params, z, shape))


@torch.no_grad()
def evaluate(state: Tree, config: Config, dataset: Dataset, seed: int, batch_size: int = 1000) -> dict[str, float]:
    """Test-set negative ELBO (β = 1, nats per image, the pytorch/examples test loss),
    plus the IWAE bound with the run's k when k > 1."""
    params = state["params"]
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(seed)
    shape = dataset.shape
    encode, decode = ARCHITECTURES[config.model][1:]
    elbo = partial(negative_elbo, encode, partial(decode, shape=shape))
    iwae = partial(negative_iwae_bound, encode, partial(decode, shape=shape))
    totals = {"test_loss": 0.0, "test_reconstruction": 0.0, "test_kl": 0.0}
    if config.iwae_k > 1:
        totals["test_iwae_loss"] = 0.0
    for x in dataset.test.split(batch_size):
        x = x.to(device)
        eps = torch.randn(len(x), config.latent_dim, generator=generator).to(device)
        terms = elbo(params, x, eps)
        totals["test_loss"] += terms["loss"].sum().item()
        totals["test_reconstruction"] += terms["reconstruction"].sum().item()
        totals["test_kl"] += terms["kl"].sum().item()
        if config.iwae_k > 1:
            eps_k = torch.randn(config.iwae_k, len(x), config.latent_dim, generator=generator).to(device)
            totals["test_iwae_loss"] += iwae(params, x, eps_k)["loss"].sum().item()
    return {name: total / len(dataset.test) for name, total in totals.items()}


ARCHITECTURES = {"vae": (mlp_init, mlp_encode, mlp_decode), "conv-vae": (conv_init, conv_encode, conv_decode)}
DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 1e-3, "b1": 0.9, "b2": 0.999, "latent_dim": 20,
            "hidden_dim": 400}

MLP_VAE = Family("vae", "MLP VAE, 784-400-20 (pytorch/examples), Bernoulli decoder", ("image",),
                 DEFAULTS, init, make_step, make_noise, generate, evaluate)
CONV_VAE = Family("conv-vae", "convolutional VAE (2 stride-2 convs, 256 hidden, 20 latent)", ("image",),
                  {**DEFAULTS, "hidden_dim": 256}, init, make_step, make_noise, generate, evaluate,
                  image_side_multiple=4)

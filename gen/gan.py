"""Generative adversarial networks: the original GAN (minimax and non-saturating
losses), DCGAN, WGAN-GP and SNGAN, as four families sharing one training step.

A generator G maps noise z ~ N(0, I) to data; a discriminator (a *critic* for
WGAN) D maps data to one real number, a logit. Each step updates D on
n_critic real batches (n_critic = 1 except WGAN-GP), then G once; every loss
below is per example, in terms of D's logits, and the step minimises batch
means. Images enter the networks in [-1, 1] (the tanh generator's range);
2D points stay in data space. With `--ema-decay d` the state also carries an
exponential moving average of G's weights (bias-corrected, so it starts at G's
first update rather than its init), which sampling and evaluation use.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from gen import dcgan, nn
from gen.config import Config
from gen.data import Dataset
from gen.metrics import mode_coverage
from gen.models import Family, make_optimizer
from gen.optim import power
from gen.tree import Params, Tree, leaves, take, with_leaves, with_prefix

# --- losses: D(x) is a logit, σ(D(x)) the probability that x is real ---------------------


def minimax_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-log σ(D(x)) - log(1 - σ(D(G(z))))  (Goodfellow et al. 2014, eq. 1; log σ(-a) = -softplus(a))."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def minimax_generator_loss(fake_logits: Tensor) -> Tensor:
    """log(1 - σ(D(G(z)))): the minimax game's own generator objective, which saturates when D wins."""
    return -F.softplus(fake_logits)


def non_saturating_generator_loss(fake_logits: Tensor) -> Tensor:
    """-log σ(D(G(z))): same fixed point, strong gradients early on (Goodfellow et al. 2014, §3)."""
    return F.softplus(-fake_logits)


def wasserstein_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """f(G(z)) - f(x): minimising it maximises the Kantorovich-Rubinstein estimate
    W(p_r, p_g) ≈ E[f(x)] - E[f(G(z))] over critics f (Arjovsky et al. 2017, eq. 3)."""
    return fake_scores - real_scores


def wasserstein_generator_loss(fake_scores: Tensor) -> Tensor:
    """-f(G(z))."""
    return -fake_scores


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """max(0, 1 - D(x)) + max(0, 1 + D(G(z)))  (Lim & Ye 2017; Miyato et al. 2018, eq. 16)."""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """-D(G(z))."""
    return -fake_logits


LOSSES = {  # name -> (discriminator loss, generator loss)
    "minimax": (minimax_discriminator_loss, minimax_generator_loss),
    "non-saturating": (minimax_discriminator_loss, non_saturating_generator_loss),
    "wasserstein": (wasserstein_critic_loss, wasserstein_generator_loss),
    "hinge": (hinge_discriminator_loss, hinge_generator_loss),
}


def gradient_penalty(critic, real: Tensor, fake: Tensor, epsilon: Tensor) -> Tensor:
    """(‖∇_x̂ f(x̂)‖₂ - 1)², x̂ = ε x + (1 - ε) G(z), ε ~ U[0, 1]  (Gulrajani et al. 2017, Alg. 1, lines 6-7).

    `critic(x) -> scores (B,)`, each example scored on its own (WGAN-GP's critic
    has neither batch norm nor packing; networks_init refuses both), so the
    gradient of the summed scores with respect to the batch holds every
    example's own input gradient: ∂/∂x̂_i Σ_j f(x̂_j) = ∇f(x̂_i). (The same
    numbers as vmap over per-example grads, which Dynamo took 0.6 s longer to
    trace: 3.6 s against 3.0 for WGAN-GP's whole step.) The step
    differentiates this again with respect to the critic's parameters (a
    gradient of a gradient).
    Deviation: the norm is sqrt(Σ g² + 1e-12), whose derivative exists at g = 0.
    Returns (B,)."""
    eps = epsilon.reshape(-1, *[1] * (real.ndim - 1))
    interpolates = eps * real + (1 - eps) * fake
    input_grads = grad(lambda x: critic(x).sum())(interpolates)        # (B, *shape)
    norms = (input_grads.pow(2).flatten(1).sum(1) + 1e-12).sqrt()      # (B,)
    return (norms - 1).pow(2)


# --- MLP networks (2D points, or images flattened) -------------------------------------

MLP_DEPTH = 3  # hidden layers in G and in D


def mlp_generator_init(generator: torch.Generator, shape: tuple, latent_dim: int, hidden_dim: int):
    sizes = [latent_dim] + [hidden_dim] * MLP_DEPTH
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        params.update(with_prefix(f"hidden{i + 1}", nn.linear_init(generator, fan_in, fan_out)))
    params.update(with_prefix("output", nn.linear_init(generator, hidden_dim, math.prod(shape))))
    return params, {}


def mlp_generator(params: Params, state: Params, z: Tensor, shape: tuple, training: bool):
    """z → [Linear → ReLU] × depth → Linear; tanh into [-1, 1] for images, data space for points."""
    h = z
    for i in range(MLP_DEPTH):
        h = F.relu(nn.linear(take(params, f"hidden{i + 1}"), h))
    out = nn.linear(take(params, "output"), h).reshape(len(z), *shape)
    return (torch.tanh(out) if len(shape) == 3 else out), state


def mlp_discriminator_init(generator: torch.Generator, shape: tuple, hidden_dim: int, spectral: bool):
    sizes = [math.prod(shape)] + [hidden_dim] * MLP_DEPTH
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        params.update(with_prefix(f"hidden{i + 1}", nn.linear_init(generator, fan_in, fan_out)))
    params.update(with_prefix("output", nn.linear_init(generator, hidden_dim, 1)))
    layers = [f"hidden{i + 1}" for i in range(MLP_DEPTH)] + ["output"]
    state = {f"{layer}.u": nn.spectral_norm_init(generator, params[f"{layer}.weight"])["u"]
             for layer in layers} if spectral else {}
    return params, state


def mlp_discriminator(params: Params, state: Params, x: Tensor, training: bool):
    """x → [Linear → LeakyReLU(0.2)] × depth → Linear → logit (B,); W/σ(W) in every layer for SNGAN."""
    h = x.flatten(1)
    for i in range(MLP_DEPTH):
        layer, state = dcgan.spectral_weights(params, state, f"hidden{i + 1}", training)
        h = F.leaky_relu(nn.linear(layer, h), 0.2)
    layer, state = dcgan.spectral_weights(params, state, "output", training)
    return nn.linear(layer, h)[:, 0], state


# --- which networks each family uses -------------------------------------------------


def uses_convolutions(config: Config, shape: tuple) -> bool:
    """DCGAN always; WGAN-GP and SNGAN on images; the plain GAN never (an MLP on flattened pixels)."""
    return len(shape) == 3 and config.model != "gan"


def packing(config: Config) -> int:
    """PacGAN (Lin et al. 2018): D sees m samples at once, all real or all generated, concatenated.

    A packed D can tell that m generated samples come from too few modes, which
    penalises mode collapse; m = 1 is the ordinary GAN. MLP discriminators only."""
    return config.pack or 1


def check_batch_size(config: Config, shape: tuple) -> None:
    """Refuse a batch size the networks cannot train on (networks_init runs this; gen bench
    too, before it times anything)."""
    if uses_convolutions(config, shape) and config.batch_size < 2:
        # G's batch norm over one example has no variance to estimate (the unbiased running
        # variance divides by n − 1): torch.nn.BatchNorm refuses it too.
        raise ValueError(f"--batch-size {config.batch_size} is too small for {config.model}'s batch norm on "
                         "images: use --batch-size 2 or more")


def networks_init(config: Config, shape: tuple, generator: torch.Generator):
    """((G params, G state), (D params, D state)) for the family and data shape."""
    if packing(config) > 1 and (uses_convolutions(config, shape) or config.model == "wgan-gp"):
        network = "a convolutional discriminator" if uses_convolutions(config, shape) else "a per-example critic"
        raise ValueError(f"--pack applies to the MLP discriminators of gan and sngan only, and {config.model} "
                         f"{'on images ' if len(shape) == 3 else ''}has {network}: leave it out")
    check_batch_size(config, shape)
    if uses_convolutions(config, shape):
        norm = {"dcgan": "batch", "wgan-gp": "none", "sngan": "spectral"}[config.model]
        return (dcgan.generator_init(generator, shape, config.latent_dim),
                dcgan.discriminator_init(generator, shape, norm))
    return (mlp_generator_init(generator, shape, config.latent_dim, config.hidden_dim),
            mlp_discriminator_init(generator, (packing(config), *shape), config.hidden_dim,
                                   spectral=config.model == "sngan"))


def networks(config: Config, shape: tuple):
    """The apply functions (G(params, state, z, training), D(params, state, x, training))."""
    if uses_convolutions(config, shape):
        return (lambda p, s, z, training: dcgan.generator(p, s, z, shape, training)), dcgan.discriminator
    m = packing(config)

    def packed_discriminator(params, state, x, training):
        # (b m) ... -> b (m ...): m consecutive examples side by side
        return mlp_discriminator(params, state, x.reshape(len(x) // m, -1), training)

    return (lambda p, s, z, training: mlp_generator(p, s, z, shape, training)), packed_discriminator


# --- the family: init, step, noise, sampling, evaluation -----------------------------


def init(config: Config, shape: tuple, seed: int) -> Tree:
    generator = torch.Generator().manual_seed(seed)
    (g_params, g_state), (d_params, d_state) = networks_init(config, shape, generator)
    g_optimizer, d_optimizer = optimizers(config)
    # The average starts at G's initial weights; its own tensors (clone), since Dynamo guards on
    # identity and safetensors refuses shared storage.
    ema = {k: v.clone() for k, v in with_prefix("generator", g_params).items()} if config.ema_decay else {}
    return pack_state({**with_prefix("generator", g_params), **with_prefix("discriminator", d_params)},
                      {"generator": g_optimizer.init(g_params), "discriminator": d_optimizer.init(d_params)},
                      {**with_prefix("generator", g_state), **with_prefix("discriminator", d_state)}, ema)


def pack_state(params: Params, opt_state: Tree, model_state: Params, ema: Params) -> Tree:
    """The state tree {"params", "opt_state"[, "model_state"][, "ema"]}, always in this key order
    (Dynamo guards on it). "model_state" only when there is some (batch norm, spectral norm), "ema"
    (G's averaged weights, named like params: "generator.…") only with --ema-decay: a checkpoint
    flattens an empty dict away, and a resumed state must look like a fresh one."""
    state = {"params": params, "opt_state": opt_state}
    if model_state:
        state["model_state"] = model_state
    if ema:
        state["ema"] = ema
    return state


def optimizers(config: Config):
    """(G's optimizer, D's optimizer), both on the configured learning-rate schedule."""
    return make_optimizer(config), make_optimizer(discriminator_config(config))


def discriminator_config(config: Config) -> Config:
    """The config D's optimizer is built from. A schedule counts optimizer updates and D makes
    n_critic of them per step, so D's spans n_critic × decay_steps updates: G's and D's learning
    rates then decay together to (nearly) zero on the run's last step, instead of D's reaching zero
    after 1/n_critic of the run."""
    n_critic = batches_per_step(config)
    if config.decay_steps is None or n_critic == 1:
        return config
    return replace(config, decay_steps=config.decay_steps * n_critic)


def reuses_fake(config: Config) -> bool:
    """Whether G's update reuses the D update's G(z) (pytorch/examples' DCGAN): with one D update
    per step. WGAN-GP keeps Algorithm 1's fresh z for G after its critic loop."""
    return batches_per_step(config) == 1 and config.model != "wgan-gp"


def batches_per_step(config: Config) -> int:
    return config.n_critic or 1


def make_step(config: Config, shape: tuple):
    g_optimizer, d_optimizer = optimizers(config)
    apply_generator, apply_discriminator = networks(config, shape)
    discriminator_loss, generator_loss = LOSSES[config.gan_loss]
    n_critic = batches_per_step(config)
    penalised = config.model == "wgan-gp"
    reuse = reuses_fake(config)
    ema_decay = config.ema_decay
    is_image = len(shape) == 3

    def discriminator_objective(d_params, d_state, real, fake, epsilon):
        real_logits, d_state = apply_discriminator(d_params, d_state, real, True)
        fake_logits, d_state = apply_discriminator(d_params, d_state, fake, True)
        real_logits, fake_logits = nn.at_least_float32(real_logits), nn.at_least_float32(fake_logits)
        loss = discriminator_loss(real_logits, fake_logits)                  # (B / pack,)
        metrics = {"d_loss": loss.mean(), "d_real": real_logits.mean(), "d_fake": fake_logits.mean()}
        if penalised:
            # L = E[f(G(z)) - f(x)] + λ E[(‖∇f(x̂)‖ - 1)²]  (WGAN-GP, Algorithm 1)
            critic = lambda x: apply_discriminator(d_params, d_state, x, True)[0]  # noqa: E731
            penalty = gradient_penalty(critic, real, fake, epsilon)
            loss = loss + config.gp_weight * penalty
            metrics["gradient_penalty"] = penalty.mean()
        return loss.mean(), (metrics, d_state)

    def fake_objective(fake, d_params, d_state):
        """G's loss as a function of its samples, under the updated D.

        D runs in training mode, as pytorch/examples' DCGAN runs netD(fake) in G's update: its batch
        norm normalises the fake batch by that batch's own statistics (the gradient G gets), and its
        state advances, on purpose: the running statistics take this fake batch in and spectral norm's
        u gets one more power iteration, after the real and the fake batch of each D update (with
        n_critic = 1, three advances a step). D's running statistics are never read (only G is run
        for sampling); D's params do not move."""
        fake_logits, d_state = apply_discriminator(d_params, d_state, fake, True)
        loss = generator_loss(nn.at_least_float32(fake_logits)).mean()
        return loss, ({"g_loss": loss}, d_state)

    def generator_objective(g_params, g_state, d_params, d_state, z):
        fake, g_state = apply_generator(g_params, g_state, z, True)
        loss, (metrics, d_state) = fake_objective(fake, d_params, d_state)
        return loss, (metrics, g_state, d_state)

    metric_names = ("d_loss", "d_real", "d_fake") + (("gradient_penalty",) if penalised else ())

    @torch.compiler.nested_compile_region
    def critic_update_leaves(d_params, d_opt, d_state, g_params, g_state, real, z, epsilon):
        # G is a constant here: D's gradient does not flow into it, so no detach is needed.
        fake, _ = apply_generator(g_params, g_state, z, True)
        grads, (_, (metrics, d_state)) = grad_and_value(discriminator_objective, has_aux=True)(
            d_params, d_state, real, fake, epsilon)
        d_params, d_opt = d_optimizer.update(grads, d_opt, d_params)
        return tuple(leaves({"params": d_params, "opt": d_opt, "state": d_state,
                             "metrics": {k: metrics[k] for k in metric_names}}))

    def critic_update(d_params, d_opt, d_state, g_params, g_state, real, z, epsilon):
        """One of the n_critic critic updates. Dynamo traces it once and stamps that graph out for
        the others (torch.compiler.nested_compile_region), instead of tracing the gradient penalty's
        double backward n_critic times: WGAN-GP b256's compile probe went from 65 to 25 s cold and
        9.2 to 5.6 s warm (bench/README.md has the latest). A reusable region must return tensors
        only, hence the flat tuple of leaves, rebuilt here into (d_params, d_opt, d_state, metrics)."""
        new_leaves = critic_update_leaves(d_params, d_opt, d_state, g_params, g_state, real, z, epsilon)
        updated = with_leaves({"params": d_params, "opt": d_opt, "state": d_state,
                               "metrics": dict.fromkeys(metric_names)}, new_leaves)
        return updated["params"], updated["opt"], updated["state"], updated["metrics"]

    def step(state: Tree, batch: Tensor, inputs: dict[str, Tensor]) -> tuple[Tree, dict[str, Tensor]]:
        g_params, d_params = take(state["params"], "generator"), take(state["params"], "discriminator")
        model_state = state.get("model_state", {})
        g_state, d_state = take(model_state, "generator"), take(model_state, "discriminator")
        g_opt, d_opt = state["opt_state"]["generator"], state["opt_state"]["discriminator"]
        real_batches = batch.reshape(n_critic, -1, *shape)
        if is_image:
            real_batches = real_batches * 2 - 1                                # [0, 1] → tanh's [-1, 1]
        if reuse:  # one D update
            z = inputs["z_discriminator"][0]
            # fake = G(z) once, keeping its pullback v ↦ vᵀ ∂G(z)/∂θ_G for G's update below
            # (this forward also advances G's batch-norm statistics, once per step).
            fake, generator_vjp, g_state = vjp(
                lambda p: apply_generator(p, g_state, z, True), g_params, has_aux=True)
            grads, (_, (metrics, d_state)) = grad_and_value(discriminator_objective, has_aux=True)(
                d_params, d_state, real_batches[0], fake, None)
            d_params, d_opt = d_optimizer.update(grads, d_opt, d_params)
        else:
            for k in range(n_critic):  # unrolled when compiled (n_critic is fixed for the run)
                epsilon = inputs["epsilon"][k] if penalised else None
                d_params, d_opt, d_state, metrics = critic_update(
                    d_params, d_opt, d_state, g_params, g_state, real_batches[k], inputs["z_discriminator"][k], epsilon)
        if reuse:
            # The same fake through the updated D: ∂L_G/∂θ_G = (∂G(z)/∂θ_G)ᵀ ∂L_G/∂fake, one vjp
            # instead of a second forward and backward of G.
            fake_grad, (g_metrics, d_state) = grad(fake_objective, has_aux=True)(fake, d_params, d_state)
            (grads,) = generator_vjp(fake_grad)
        else:
            grads, (_, (g_metrics, g_state, d_state)) = grad_and_value(generator_objective, has_aux=True)(
                g_params, g_state, d_params, d_state, inputs["z_generator"])
        g_params, g_opt = g_optimizer.update(grads, g_opt, g_params)
        ema = {}
        if ema_decay:
            # The bias-corrected EMA of G's weights after its update (Yazıcı et al. 2019, §2, with
            # Adam's correction): m_t = d·m_{t−1} + (1 − d)·θ_t from m_0 = 0, and θ̄_t = m_t / (1 − dᵗ),
            # kept in its corrected form:
            #     θ̄_t = θ̄_{t−1} + w_t·(θ_t − θ̄_{t−1}),   w_t = (1 − d) / (1 − dᵗ)
            # w_1 = 1, so the average never holds G's random init: uncorrected, with d = 0.999, a
            # 200-step run would sample from weights still 82% (0.999²⁰⁰) those of the init.
            t = g_opt["count"].to(torch.float64)                         # G's updates, this one included
            weight = ((1 - ema_decay) / (1 - power(ema_decay, t))).to(torch.float32)
            ema = {name: state["ema"][name] + weight * (value - state["ema"][name])
                   for name, value in with_prefix("generator", g_params).items()}
        new_state = pack_state({**with_prefix("generator", g_params), **with_prefix("discriminator", d_params)},
                               {"generator": g_opt, "discriminator": d_opt},
                               {**with_prefix("generator", g_state), **with_prefix("discriminator", d_state)},
                               ema)
        return new_state, {**metrics, **g_metrics}

    if not reuse:
        # Inductor's C++ wrapper (gen/compilation.py) cannot yet call a stamped-out region
        # ("codegen invoke_subgraph is not implemented for cpp wrapper", torch 2.13).
        step.inductor_options = {"cpp_wrapper": False}
    return step


def make_noise(config: Config, shape: tuple, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """z for each critic update (n_critic, B, latent); z for the generator update (B, latent) unless
    it reuses the D update's G(z) (`reuses_fake`); for WGAN-GP the interpolation weights
    ε ~ U[0, 1] (n_critic, B)."""
    n_critic = batches_per_step(config)
    noise = {"z_discriminator": torch.randn(n_critic, batch_size, config.latent_dim, generator=generator)}
    if not reuses_fake(config):
        noise["z_generator"] = torch.randn(batch_size, config.latent_dim, generator=generator)
    if config.model == "wgan-gp":
        noise["epsilon"] = torch.rand(n_critic, batch_size, generator=generator)
    return noise


@torch.no_grad()
def generate(state: Tree, config: Config, shape: tuple, n: int, generator: torch.Generator) -> Tensor:
    """G(z), z ~ N(0, I), batch norm on its running statistics: images in [0, 1], points in data space.

    With an EMA in the state, G runs on the averaged weights (Yazıcı et al. 2019); batch norm's
    running statistics are the live model's, as there is no average of them."""
    params = take(state.get("ema") or state["params"], "generator")
    device = next(iter(params.values())).device
    z = torch.randn(n, config.latent_dim, generator=generator).to(device)
    apply_generator, _ = networks(config, shape)
    samples, _ = apply_generator(params, take(state.get("model_state", {}), "generator"), z, False)
    return (samples + 1) / 2 if len(shape) == 3 else samples


def evaluate(state: Tree, config: Config, dataset: Dataset, seed: int) -> dict[str, float]:
    """Mode coverage of `config.eval_samples` samples on a Gaussian mixture (gen/metrics.py); {} otherwise."""
    if dataset.modes is None:
        return {}
    generator = torch.Generator().manual_seed(seed)
    samples = generate(state, config, dataset.shape, config.eval_samples, generator)
    return mode_coverage(samples, dataset.modes, dataset.mode_std)


# Defaults for 2D mixtures (the grid25 experiment in docs/gan_results.md); the
# image families use the DCGAN paper's Adam(2e-4, β1 = 0.5) and batch 128/64.
# epochs, not steps, so that `--epochs N` can override it (Config refuses both); 50 epochs of
# 100k points at batch 256 is about 19.5k steps.
TOY_DEFAULTS = {"epochs": 50, "batch_size": 256, "lr": 1e-3, "b1": 0.5, "b2": 0.999, "latent_dim": 8,
                "hidden_dim": 128, "n_critic": 1, "pack": 1}
GAN = Family("gan", "GAN with MLP generator and discriminator (non-saturating or --gan-loss minimax)",
             ("points", "image"), {**TOY_DEFAULTS, "gan_loss": "non-saturating"},
             init, make_step, make_noise, generate, evaluate, batches_per_step)
DCGAN = Family("dcgan", "DCGAN: 2 transposed convs with batch norm (G), 2 convs with batch norm (D)", ("image",),
               {"epochs": 5, "batch_size": 64, "lr": 2e-4, "b1": 0.5, "b2": 0.999, "latent_dim": 100,
                "gan_loss": "non-saturating", "n_critic": 1, "pack": 1},
               init, make_step, make_noise, generate, evaluate, batches_per_step, image_side_multiple=4,
               hidden_dim_on_images=False)
WGAN_GP = Family("wgan-gp", "WGAN-GP: Wasserstein critic with gradient penalty, n_critic critic steps per step",
                 ("points", "image"), {**TOY_DEFAULTS, "lr": 1e-4, "b1": 0.5, "b2": 0.9, "n_critic": 5,
                                       "epochs": 10, "gan_loss": "wasserstein"},
                 init, make_step, make_noise, generate, evaluate, batches_per_step, image_side_multiple=4,
                 hidden_dim_on_images=False)
# SNGAN's defaults are the grid25 winner of docs/gan_results.md (25 of 25 modes, 96-97 % high
# quality, seeds 0-2, about 3 minutes on one core): Adam(1e-3, 0, 0.9) decaying linearly to 0,
# batch 512, 110 epochs of the 100k-point toy sets (21,450 steps), sampled from a G weight EMA.
SNGAN = Family("sngan", "SNGAN: spectrally normalised discriminator, hinge loss", ("points", "image"),
               {**TOY_DEFAULTS, "lr": 1e-3, "b1": 0.0, "b2": 0.9, "gan_loss": "hinge", "batch_size": 512,
                "epochs": 110, "lr_schedule": "linear", "ema_decay": 0.999},
               init, make_step, make_noise, generate, evaluate, batches_per_step, image_side_multiple=4,
               hidden_dim_on_images=False)
FAMILIES = [GAN, DCGAN, WGAN_GP, SNGAN]

"""DCGAN's convolutional generator and discriminator for small grey images
(Radford et al. 2016), in the two-stride-2-layer form used for 28x28 MNIST:

    G: z(100) → Linear(128·h·w, no bias) → BN → ReLU → (128, h, w)
         → ConvT(128→64, k4 s2 p1, no bias) → BN → ReLU → ConvT(64→C, k4 s2 p1) → tanh
    D: x → Conv(C→64, k4 s2 p1) → LReLU(0.2) → Conv(64→128, k4 s2 p1, no bias) → BN → LReLU(0.2)
         → Linear(128·h·w → 1)

with (h, w) = (H/4, W/4): (7, 7) for 28x28 MNIST, (2, 2) for 8x8 digits. The discriminator's
normalisation is a choice: "batch" (DCGAN), "spectral" (SN-DCGAN, Miyato et
al. 2018: every weight divided by its spectral norm, no batch norm) or "none"
(the WGAN-GP critic, whose per-example gradient penalty batch norm would
couple across examples; Gulrajani et al. 2017, §4).

On the CPU the layers next to the image (D's first convolution, G's last
transposed one, one image channel) and D's output layer are computed as matmuls
(gen.nn.image_conv2d, image_conv_transpose2d, map_linear): the same layers with
the same params, faster there than oneDNN's direct convolution with one channel
(bench/README.md). On CUDA they are cuDNN's convolutions and a plain linear.

Every network here is `xxx_init(generator, ...) -> (params, state)` plus
`xxx(params, state, x, training) -> (output, state)`: batch-norm running
statistics and spectral-norm vectors go in and come back, never mutated.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from gen import nn
from gen.tree import Params, take, with_prefix

WIDTH = 64  # channels after the first stride-2 layer; 2·WIDTH after the second


def dcgan_normal_(generator: torch.Generator, params: Params) -> Params:
    """DCGAN's initialisation (§4): weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0."""
    out = {}
    for name, value in params.items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.02 * torch.randn(value.shape, generator=generator)
        elif name.endswith("weight"):
            out[name] = 0.02 * torch.randn(value.shape, generator=generator)
        else:
            out[name] = torch.zeros_like(value)
    return out


def _batch_norm(params: Params, state: Params, name: str, x: Tensor, training: bool) -> tuple[Tensor, Params]:
    y, new = nn.batch_norm(take(params, name), take(state, name), x, training)
    return y, {**state, **with_prefix(name, new)}


# --- generator -------------------------------------------------------------------


def generator_init(generator: torch.Generator, shape: tuple, latent_dim: int) -> tuple[Params, Params]:
    channels, height, width = shape
    base = (height // 4) * (width // 4)  # the projection's feature map, (H/4)·(W/4)
    norm1, norm1_state = nn.batch_norm_init(2 * WIDTH * base)
    norm2, norm2_state = nn.batch_norm_init(WIDTH)
    params = {
        **with_prefix("project", nn.linear_init(generator, latent_dim, 2 * WIDTH * base, bias=False)),
        **with_prefix("project_norm", norm1),
        **with_prefix("deconv1", nn.conv_transpose2d_init(generator, 2 * WIDTH, WIDTH, 4, bias=False)),
        **with_prefix("deconv1_norm", norm2),
        **with_prefix("deconv2", nn.conv_transpose2d_init(generator, WIDTH, channels, 4)),
    }
    state = {**with_prefix("project_norm", norm1_state), **with_prefix("deconv1_norm", norm2_state)}
    return dcgan_normal_(generator, params), state


def generator(params: Params, state: Params, z: Tensor, shape: tuple, training: bool) -> tuple[Tensor, Params]:
    """z (B, latent) → images (B, C, H, W) in [-1, 1]."""
    h = nn.linear(take(params, "project"), z)                                     # (B, 128·H/4·W/4)
    h, state = _batch_norm(params, state, "project_norm", h, training)
    h = F.relu(h).unflatten(1, (2 * WIDTH, shape[1] // 4, shape[2] // 4))        # (B, 128, H/4, W/4)
    h = nn.conv_transpose2d(take(params, "deconv1"), h, stride=2, padding=1)      # (B, 64, H/2, W/2)
    h, state = _batch_norm(params, state, "deconv1_norm", h, training)
    h = nn.image_conv_transpose2d(take(params, "deconv2"), F.relu(h), stride=2, padding=1)  # (B, C, H, W)
    return torch.tanh(h), state


# --- discriminator ---------------------------------------------------------------


def discriminator_init(generator: torch.Generator, shape: tuple, norm: str = "batch") -> tuple[Params, Params]:
    channels, height, width = shape
    batch = norm == "batch"
    norm_params, norm_state = nn.batch_norm_init(2 * WIDTH)
    params = {
        **with_prefix("conv1", nn.conv2d_init(generator, channels, WIDTH, 4)),
        # DCGAN drops the bias before batch norm (its shift β does the job).
        **with_prefix("conv2", nn.conv2d_init(generator, WIDTH, 2 * WIDTH, 4, bias=not batch)),
        **(with_prefix("conv2_norm", norm_params) if batch else {}),
        **with_prefix("output", nn.linear_init(generator, 2 * WIDTH * (height // 4) * (width // 4), 1)),
    }
    params = dcgan_normal_(generator, params)
    state = with_prefix("conv2_norm", norm_state) if batch else {}
    if norm == "spectral":
        state = {f"{layer}.u": nn.spectral_norm_init(generator, params[f"{layer}.weight"])["u"]
                 for layer in ("conv1", "conv2", "output")}
    return params, state


def spectral_weights(params: Params, state: Params, layer: str, training: bool) -> tuple[Params, Params]:
    """A layer's params with W / σ(W) when the layer is spectrally normalised (its `u` is in state).

    One power-iteration step per call refines u; training returns the new u
    (as torch.nn.utils.spectral_norm does in train mode), evaluation keeps the old one."""
    layer_params = take(params, layer)
    if f"{layer}.u" not in state:
        return layer_params, state
    weight, new = nn.spectral_normalize(layer_params["weight"], {"u": state[f"{layer}.u"]})
    return {**layer_params, "weight": weight}, ({**state, f"{layer}.u": new["u"]} if training else state)


def discriminator(params: Params, state: Params, x: Tensor, training: bool) -> tuple[Tensor, Params]:
    """Images (B, C, H, W) in [-1, 1] → logits (B,)."""
    conv1, state = spectral_weights(params, state, "conv1", training)
    h = F.leaky_relu(nn.image_conv2d(conv1, x, stride=2, padding=1), 0.2)   # (B, 64, H/2, W/2)
    conv2, state = spectral_weights(params, state, "conv2", training)
    h = nn.conv2d(conv2, h, stride=2, padding=1)                                  # (B, 128, H/4, W/4)
    if "conv2_norm.weight" in params:
        h, state = _batch_norm(params, state, "conv2_norm", h, training)
    h = F.leaky_relu(h, 0.2)
    output, state = spectral_weights(params, state, "output", training)
    return nn.map_linear(output, h)[:, 0], state                                 # linear(h.flatten(1))

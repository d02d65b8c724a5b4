"""Layers as pure functions: every layer is `xxx_init(generator, ...) -> Params`
plus `xxx(params, x, ...) -> Tensor`.

Params are flat `dict[str, Tensor]` in torch layout, so `F.linear`/`F.conv2d`
apply them directly and `torch.func.functional_call` can run the same dict
through an `nn.Module` in parity tests. Initialisers draw from the
`torch.Generator` they are given (never the global RNG) with the same
distributions as `torch.nn`'s defaults. Layers with state that is not learned
(batch norm's running statistics, spectral norm's power-iteration vector) take
that state as an argument and return its new value, the way Flax threads
`batch_stats`: nothing is mutated in place.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gen.tree import Params


def uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float) -> Tensor:
    """U(-bound, bound)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


# --- linear ---------------------------------------------------------------------


def linear_init(generator: torch.Generator, in_features: int, out_features: int, bias: bool = True) -> Params:
    # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # and the bias uses the same bound.
    bound = 1 / math.sqrt(in_features)
    params = {"weight": uniform(generator, (out_features, in_features), bound)}
    if bias:
        params["bias"] = uniform(generator, (out_features,), bound)
    return params


def linear(params: Params, x: Tensor) -> Tensor:
    """y = x Wᵀ + b."""
    return F.linear(x, params["weight"], params.get("bias"))


# --- convolutions -----------------------------------------------------------------


def conv2d_init(generator: torch.Generator, in_channels: int, out_channels: int, kernel_size: int,
                bias: bool = True) -> Params:
    bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
    params = {"weight": uniform(generator, (out_channels, in_channels, kernel_size, kernel_size), bound)}
    if bias:
        params["bias"] = uniform(generator, (out_channels,), bound)
    return params


def conv2d(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    return F.conv2d(x, params["weight"], params.get("bias"), stride=stride, padding=padding)


def conv2d_as_matmul(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """conv2d(params, x) as one matmul over x's patches (im2col):

        y[b, :, i, j] = W · patch(x)[b, i, j] + bias,   patch = the C·k·k inputs under the kernel at (i, j)

    The faster form for a layer with few input channels, the first layer on grey or RGB images:
    there oneDNN's direct convolution has little to vectorise over (DCGAN's 1→64 layer ran at about
    30 GFLOP/s on this project's CPU), while the matmul has all the output channels. The result is
    (B, out, Ho, Wo) with channels-last strides, the layout the next convolution reads.
    """
    weight = params["weight"]                                            # (out, C, k, k)
    kernel = weight.shape[2:]
    height = (x.shape[2] + 2 * padding - kernel[0]) // stride + 1
    width = (x.shape[3] + 2 * padding - kernel[1]) // stride + 1
    patches = F.unfold(x, kernel, padding=padding, stride=stride)        # (B, C·k·k, Ho·Wo)
    y = F.linear(patches.transpose(1, 2), weight.flatten(1), params.get("bias"))  # (B, Ho·Wo, out)
    return y.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def conv_transpose2d_init(generator: torch.Generator, in_channels: int, out_channels: int, kernel_size: int,
                          bias: bool = True) -> Params:
    # Weight layout (in, out, k, k). torch computes fan_in from dim 1 of that
    # layout, i.e. out_channels * k * k; we keep its convention for parity.
    bound = 1 / math.sqrt(out_channels * kernel_size * kernel_size)
    params = {"weight": uniform(generator, (in_channels, out_channels, kernel_size, kernel_size), bound)}
    if bias:
        params["bias"] = uniform(generator, (out_channels,), bound)
    return params


def conv_transpose2d(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    return F.conv_transpose2d(x, params["weight"], params.get("bias"), stride=stride, padding=padding)


def conv_transpose2d_as_matmul(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """conv_transpose2d(params, x) as one matmul and a fold (col2im):

        cols[b, (i, j)] = x[b, :, i, j] · W      (C_in → out·k·k: what input pixel (i, j) adds under the kernel)
        y[b, :, p, q]   = Σ cols over the (i, j) whose kernel covers (p, q)  + bias

    The faster form when few channels come out (the last layer of an image generator), for the
    same reason as conv2d_as_matmul: oneDNN ran DCGAN's 64→1 layer at about 14 GFLOP/s here.
    """
    weight = params["weight"]                                            # (C_in, out, k, k)
    kernel = weight.shape[2:]
    height = (x.shape[2] - 1) * stride - 2 * padding + kernel[0]
    width = (x.shape[3] - 1) * stride - 2 * padding + kernel[1]
    cols = x.flatten(2).transpose(1, 2) @ weight.flatten(1)              # (B, H·W, out·k·k)
    y = F.fold(cols.transpose(1, 2), (height, width), kernel, padding=padding, stride=stride)
    if "bias" in params:  # in y's dtype: under bf16 autocast a float32 bias would promote the output
        y = y + params["bias"].to(y.dtype).reshape(1, -1, 1, 1)
    return y


def matmul_forms_pay(x: Tensor) -> bool:
    """Whether the image-facing layers run as matmuls (image_conv2d, image_conv_transpose2d,
    map_linear): on the CPU, where they beat oneDNN's one-channel convolutions. Elsewhere the
    library layers: cuDNN has no such weak spot, and on CUDA (torch 2.11, H100) Inductor's
    predicted strides for the next convolution's gradient disagreed with cuDNN's channels-last
    result after the matmul form ("expected ... stride 49==1"), failing every compiled DCGAN step.
    The device is known while tracing, so a compiled step holds one branch."""
    return x.device.type == "cpu"


def image_conv2d(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """The convolution that reads an image (few input channels): conv2d_as_matmul on the CPU,
    conv2d elsewhere (matmul_forms_pay)."""
    layer = conv2d_as_matmul if matmul_forms_pay(x) else conv2d
    return layer(params, x, stride=stride, padding=padding)


def image_conv_transpose2d(params: Params, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """The transposed convolution that writes an image (few output channels):
    conv_transpose2d_as_matmul on the CPU, conv_transpose2d elsewhere (matmul_forms_pay)."""
    layer = conv_transpose2d_as_matmul if matmul_forms_pay(x) else conv_transpose2d
    return layer(params, x, stride=stride, padding=padding)


def map_linear(params: Params, h: Tensor) -> Tensor:
    """linear(params, h.flatten(1)) for a feature map h (B, C, H, W), as a convolution whose kernel
    covers the whole map: the same weights in the same C·H·W order, computed in h's own memory
    layout. Flattening a channels-last map first copies it into NCHW order, which (with the weight
    gradient's reduction over the batch) cost DCGAN's critic about 5 ms a step on this project's
    CPU. Worth it for a few outputs (a critic's score); for many (a VAE's 256 hidden units) oneDNN
    converts the big weight to its own layout on every call and the plain linear is faster.
    Off the CPU it is the plain linear (matmul_forms_pay).
    """
    if not matmul_forms_pay(h):
        return linear(params, h.flatten(1))
    weight = params["weight"].reshape(params["weight"].shape[0], *h.shape[1:])  # (out, C, H, W)
    return F.conv2d(h, weight, params.get("bias")).flatten(1)


# --- batch norm -------------------------------------------------------------------


def batch_norm_init(num_features: int) -> tuple[Params, Params]:
    """Learned scale/shift, and the running statistics as separate state."""
    params = {"weight": torch.ones(num_features), "bias": torch.zeros(num_features)}
    state = {"running_mean": torch.zeros(num_features), "running_var": torch.ones(num_features)}
    return params, state


def batch_norm(params: Params, state: Params, x: Tensor, training: bool, momentum: float = 0.1,
               eps: float = 1e-5) -> tuple[Tensor, Params]:
    """y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β over every axis but channels (axis 1).

    Training normalises with the batch statistics and returns the updated
    running ones, r ← (1 - momentum) r + momentum · stat, with the unbiased
    variance n/(n-1) Var[x] as torch.nn.BatchNorm uses. Evaluation uses the
    running statistics and returns the state unchanged.
    """
    shape = [1, -1] + [1] * (x.ndim - 2)  # broadcast a per-channel vector over (B, C, ...)
    if training:
        axes = [0] + list(range(2, x.ndim))
        mean = x.mean(axes)
        var = x.var(axes, correction=0)
        n = x.numel() // x.shape[1]
        state = {
            "running_mean": (1 - momentum) * state["running_mean"] + momentum * mean,
            "running_var": (1 - momentum) * state["running_var"] + momentum * var * (n / (n - 1)),
        }
    else:
        mean, var = state["running_mean"], state["running_var"]
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return y * params["weight"].reshape(shape) + params["bias"].reshape(shape), state


# --- spectral norm ----------------------------------------------------------------


def spectral_norm_init(generator: torch.Generator, weight: Tensor) -> Params:
    """The power-iteration vector u (a unit vector of size out_features)."""
    u = torch.randn(weight.shape[0], generator=generator)
    return {"u": F.normalize(u, dim=0, eps=1e-12)}


def spectral_normalize(weight: Tensor, state: Params, n_power_iterations: int = 1,
                       eps: float = 1e-12) -> tuple[Tensor, Params]:
    """W / σ(W), with σ estimated by power iteration (Miyato et al. 2018, Algorithm 1):

        v ← Wᵀu / ‖Wᵀu‖,   u ← Wv / ‖Wv‖,   σ(W) ≈ uᵀ W v

    u carries over between calls, so one iteration per call (per forward in
    training) suffices. The vectors are treated as constants (no gradient flows
    through u, v), as in the paper and torch.nn.utils.spectral_norm.
    """
    if n_power_iterations < 1:  # v exists only as an iteration's product
        raise ValueError(f"spectral_normalize needs at least one power iteration, got {n_power_iterations}")
    matrix = weight.flatten(1)                                          # (out, in·k·k)
    u = state["u"]
    # Outside any autocast (`--precision bf16`): u is state that must keep its dtype in the
    # checkpoint, and σ divides every weight, so a bfloat16 σ (3 significant digits) would scale the
    # whole layer by its rounding error. These are matrix-vector products: float32 costs nothing.
    with torch.autocast(weight.device.type, enabled=False):
        with torch.no_grad():
            for _ in range(n_power_iterations):
                v = F.normalize(matrix.t() @ u, dim=0, eps=eps)
                u = F.normalize(matrix @ v, dim=0, eps=eps)
        sigma = torch.dot(u, matrix @ v)
    return weight / sigma, {"u": u}


# --- precision --------------------------------------------------------------------


def at_least_float32(t: Tensor) -> Tensor:
    """t in float32 when it is bfloat16/float16 (float64 stays): what a loss is computed from.
    Under `--precision bf16` the networks' outputs come out of autocast in bfloat16, and CPU
    autocast leaves exp, sum, softplus and (inside vmap, where it decomposes) BCE-with-logits in
    it: a VAE's KL and log-weights, a GAN's losses, would carry bf16's 3 significant digits
    (tenths of a nat for the VAEs). Only the matmuls and convolutions are meant to run in bf16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

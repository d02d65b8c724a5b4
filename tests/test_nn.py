"""Each pure layer against torch.nn at the same weights (through functional_call)."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn as tnn
from torch.func import functional_call, grad

from gen import nn
from gen.tree import take, with_prefix


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_linear_matches_torch_and_init_bounds():
    params = nn.linear_init(generator(), 30, 7)
    x = torch.randn(5, 30)
    module = tnn.Linear(30, 7)
    torch.testing.assert_close(nn.linear(params, x), functional_call(module, params, (x,)))
    bound = 1 / 30 ** 0.5
    assert params["weight"].abs().max() <= bound and params["weight"].abs().max() > 0.8 * bound
    assert "bias" not in nn.linear_init(generator(), 3, 2, bias=False)


def test_same_seed_same_params_and_other_seed_differs():
    a, b, c = nn.linear_init(generator(1), 4, 3), nn.linear_init(generator(1), 4, 3), nn.linear_init(generator(2), 4, 3)
    assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])


def test_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    nn.conv2d_init(generator(), 3, 8, 4)
    assert torch.equal(torch.rand(3), expected)


def test_conv2d_and_conv_transpose2d_match_torch():
    x = torch.randn(2, 3, 14, 14)
    params = nn.conv2d_init(generator(), 3, 8, 4)
    module = tnn.Conv2d(3, 8, 4, stride=2, padding=1)
    torch.testing.assert_close(nn.conv2d(params, x, stride=2, padding=1), functional_call(module, params, (x,)))
    params = nn.conv_transpose2d_init(generator(), 3, 5, 4, bias=False)
    module = tnn.ConvTranspose2d(3, 5, 4, stride=2, padding=1, bias=False)
    y = nn.conv_transpose2d(params, x, stride=2, padding=1)
    assert y.shape == (2, 5, 28, 28)
    torch.testing.assert_close(y, functional_call(module, params, (x,)))
    # torch's fan-in for a transposed conv weight (in, out, k, k) is out * k * k
    assert params["weight"].abs().max() <= 1 / (5 * 16) ** 0.5
    # and for a convolution's (out, in, k, k) it is in * k * k: U(-1/√48, 1/√48) for both tensors
    params = nn.conv2d_init(generator(), 3, 8, 4)
    for name in ("weight", "bias"):
        largest = params[name].abs().max()
        assert 0.8 / (3 * 16) ** 0.5 < largest <= 1 / (3 * 16) ** 0.5, name


conv_cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "c_in": st.integers(1, 4), "c_out": st.integers(1, 5),
    "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)), "stride": st.integers(1, 3),
    "padding": st.integers(0, 2), "size": st.tuples(st.integers(4, 9), st.integers(4, 9)),
    "bias": st.booleans(), "channels_last": st.booleans(), "transposed": st.booleans(),
}).filter(lambda c: not c["transposed"] or all(  # a transposed conv's output must have a pixel
    (n - 1) * c["stride"] - 2 * c["padding"] + k >= 1 for n, k in zip(c["size"], c["kernel"])))


def loss_gradients(layer, params, x):
    """Gradients of Σ y² with respect to the params and the input: the backward pass of the layer."""
    return grad(lambda p, x: layer(p, x).square().sum(), argnums=(0, 1))(params, x)


@settings(max_examples=80, deadline=None)
@given(conv_cases, st.integers(0, 2**31 - 1))
def test_convolutions_as_matmuls_match_the_direct_layers_and_their_gradients(case, seed):
    """Non-square kernels, any stride and padding, either input layout."""
    random = generator(seed)
    shape = (case["c_in"], case["c_out"]) if case["transposed"] else (case["c_out"], case["c_in"])
    params = {"weight": torch.randn(*shape, *case["kernel"], generator=random)}
    if case["bias"]:
        params["bias"] = torch.randn(case["c_out"], generator=random)
    x = torch.randn(case["batch"], case["c_in"], *case["size"], generator=random)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    stride, padding = case["stride"], case["padding"]
    if case["transposed"]:
        direct = lambda p, x: nn.conv_transpose2d(p, x, stride, padding)  # noqa: E731
        as_matmul = lambda p, x: nn.conv_transpose2d_as_matmul(p, x, stride, padding)  # noqa: E731
    else:
        direct = lambda p, x: nn.conv2d(p, x, stride, padding)  # noqa: E731
        as_matmul = lambda p, x: nn.conv2d_as_matmul(p, x, stride, padding)  # noqa: E731
    torch.testing.assert_close(as_matmul(params, x), direct(params, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_gradients(as_matmul, params, x), loss_gradients(direct, params, x),
                               rtol=1e-4, atol=1e-4)


def test_conv2d_as_matmul_returns_channels_last_for_the_next_convolution():
    params = nn.conv2d_init(generator(), 1, 8, 4)
    y = nn.conv2d_as_matmul(params, torch.randn(2, 1, 28, 28), stride=2, padding=1)
    assert y.shape == (2, 8, 14, 14) and y.is_contiguous(memory_format=torch.channels_last)


def test_image_layers_are_matmuls_on_the_cpu_and_the_library_layers_elsewhere():
    """The matmul forms are a CPU measure; on CUDA the compiled DCGAN step failed with them (gen.nn.
    image_conv2d), so every other device gets cuDNN's layers. The meta device stands in for CUDA."""
    conv, deconv = nn.conv2d_init(generator(1), 1, 8, 4), nn.conv_transpose2d_init(generator(2), 8, 1, 4)
    output = nn.linear_init(generator(3), 8 * 7 * 7, 1)
    x, h, features = torch.randn(2, 1, 28, 28), torch.randn(2, 8, 14, 14), torch.randn(2, 8, 7, 7)
    on_meta = lambda params: {k: v.to("meta") for k, v in params.items()}  # noqa: E731
    for device, matmul_calls, library_calls in (("cpu", 1, 0), ("meta", 0, 1)):
        move = (lambda t: t) if device == "cpu" else on_meta
        with mock.patch.object(nn, "conv2d_as_matmul", wraps=nn.conv2d_as_matmul) as conv_matmul, \
                mock.patch.object(nn, "conv_transpose2d_as_matmul", wraps=nn.conv_transpose2d_as_matmul) as deconv_matmul, \
                mock.patch.object(nn, "conv2d", wraps=nn.conv2d) as conv_direct, \
                mock.patch.object(nn, "conv_transpose2d", wraps=nn.conv_transpose2d) as deconv_direct, \
                mock.patch.object(nn, "linear", wraps=nn.linear) as flat_linear:
            assert nn.image_conv2d(move(conv), x.to(device), 2, 1).shape == (2, 8, 14, 14)
            assert nn.image_conv_transpose2d(move(deconv), h.to(device), 2, 1).shape == (2, 1, 28, 28)
            assert nn.map_linear(move(output), features.to(device)).shape == (2, 1)
        assert (conv_matmul.call_count, deconv_matmul.call_count) == (matmul_calls, matmul_calls), device
        assert (conv_direct.call_count, deconv_direct.call_count) == (library_calls, library_calls), device
        assert flat_linear.call_count == library_calls, device


def test_matmul_forms_keep_the_autocast_dtype():
    """Under bf16 autocast the matmul forms return bf16 like the direct layers, to bf16's precision."""
    conv, deconv = nn.conv2d_init(generator(1), 1, 8, 4), nn.conv_transpose2d_init(generator(2), 8, 1, 4)
    x, h = torch.randn(4, 1, 16, 16, generator=generator(3)), torch.randn(4, 8, 8, 8, generator=generator(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [(nn.conv2d_as_matmul(conv, x, 2, 1), nn.conv2d(conv, x, 2, 1)),
                 (nn.conv_transpose2d_as_matmul(deconv, h, 2, 1), nn.conv_transpose2d(deconv, h, 2, 1))]
    for as_matmul, direct in pairs:
        assert as_matmul.dtype == direct.dtype == torch.bfloat16
        torch.testing.assert_close(as_matmul.float(), direct.float(), rtol=0.05, atol=0.05)


def test_matmul_forms_have_the_direct_layers_second_derivatives():
    """WGAN-GP's penalty differentiates ‖∇ₓ critic‖ with respect to the params: a double backward."""
    conv = nn.conv2d_init(generator(1), 2, 4, 4)
    deconv = nn.conv_transpose2d_init(generator(2), 4, 2, 4)
    x = torch.randn(3, 2, 8, 8, generator=generator(3))

    def penalty(conv_layer, deconv_layer):
        def network(params, x):
            h = torch.tanh(conv_layer(params["conv"], x, 2, 1))
            return deconv_layer(params["deconv"], h, 2, 1).square().sum()
        return lambda params: grad(network, argnums=1)(params, x).square().sum()

    params = {"conv": conv, "deconv": deconv}
    torch.testing.assert_close(
        grad(penalty(nn.conv2d_as_matmul, nn.conv_transpose2d_as_matmul))(params),
        grad(penalty(nn.conv2d, nn.conv_transpose2d))(params), rtol=1e-4, atol=1e-5)


def test_map_linear_is_linear_over_the_flattened_map_in_either_layout():
    params = nn.linear_init(generator(), 6 * 4 * 3, 2)
    x = torch.randn(5, 6, 4, 3)
    expected = nn.linear(params, x.flatten(1))
    with pytest.raises(RuntimeError):  # a map of another size is refused, not silently reshaped
        nn.map_linear(nn.linear_init(generator(), 2 * 6 * 4 * 3, 1, bias=False), x)
    torch.testing.assert_close(nn.map_linear(params, x), expected)
    torch.testing.assert_close(nn.map_linear(params, x.contiguous(memory_format=torch.channels_last)), expected)
    torch.testing.assert_close(loss_gradients(nn.map_linear, params, x),
                               loss_gradients(lambda p, x: nn.linear(p, x.flatten(1)), params, x))


def test_batch_norm_matches_torch_in_training_and_eval():
    params, state = nn.batch_norm_init(6)
    params = {"weight": torch.rand(6) + 0.5, "bias": torch.randn(6)}
    module = tnn.BatchNorm2d(6)
    module.load_state_dict({**params, **state, "num_batches_tracked": torch.tensor(0)})
    for _ in range(3):
        x = torch.randn(8, 6, 5, 5) * 3 + 1
        y, state = nn.batch_norm(params, state, x, training=True)
        torch.testing.assert_close(y, module.train()(x))
        torch.testing.assert_close(state["running_mean"], module.running_mean)
        torch.testing.assert_close(state["running_var"], module.running_var)
    x = torch.randn(4, 6, 5, 5)
    y, same_state = nn.batch_norm(params, state, x, training=False)
    torch.testing.assert_close(y, module.eval()(x))
    assert same_state is state


def test_batch_norm_does_not_mutate_its_state():
    params, state = nn.batch_norm_init(3)
    before = {k: v.clone() for k, v in state.items()}
    nn.batch_norm(params, state, torch.randn(4, 3), training=True)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_spectral_normalize_converges_to_largest_singular_value():
    weight = torch.randn(16, 8, generator=generator(3))
    state = nn.spectral_norm_init(generator(4), weight)
    for _ in range(50):
        normalized, state = nn.spectral_normalize(weight, state)
    sigma = torch.linalg.matrix_norm(weight, ord=2)
    torch.testing.assert_close(weight / normalized, torch.full_like(weight, sigma.item()), rtol=1e-4, atol=1e-4)
    assert abs(torch.linalg.matrix_norm(normalized, ord=2).item() - 1) < 1e-4
    with pytest.raises(ValueError, match="needs at least one power iteration, got 0"):
        nn.spectral_normalize(weight, state, n_power_iterations=0)  # was an UnboundLocalError


def test_spectral_normalize_trains_like_torch_spectral_norm():
    """Five SGD steps of a spectrally normalised conv layer, against torch.nn.utils.spectral_norm from
    the same weights and u: the same u after each power iteration, the same gradient (u and v held
    constant in σ = uᵀWv), the same weights."""
    torch.manual_seed(0)
    module = tnn.utils.spectral_norm(tnn.Conv2d(3, 6, 3))
    params = {"weight": module.weight_orig.detach().clone(), "bias": module.bias.detach().clone()}
    state = {"u": module.weight_u.clone()}
    initial_weight = params["weight"].clone()
    x = torch.randn(4, 3, 8, 8, generator=generator(5))

    def loss(params, state):
        weight, new_state = nn.spectral_normalize(params["weight"], state)
        return nn.conv2d({"weight": weight, "bias": params["bias"]}, x).square().mean(), new_state

    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for step in range(5):
        grads, state = grad(loss, has_aux=True)(params, state)
        optimizer.zero_grad()
        module(x).square().mean().backward()  # the module's forward runs its power iteration
        optimizer.step()
        torch.testing.assert_close(state["u"], module.weight_u, msg=f"u, step {step}")
        torch.testing.assert_close(grads["weight"], module.weight_orig.grad, msg=f"gradient, step {step}")
        params = {name: value - 0.5 * grads[name] for name, value in params.items()}
        torch.testing.assert_close(params["weight"], module.weight_orig.detach(), msg=f"weight, step {step}")
    assert not torch.allclose(params["weight"], initial_weight)  # it trained


def test_prefix_and_take_are_inverse():
    params = nn.linear_init(generator(), 2, 3)
    model = {**with_prefix("encoder.fc", params), **with_prefix("decoder.fc", nn.linear_init(generator(), 3, 2))}
    assert list(model) == ["encoder.fc.weight", "encoder.fc.bias", "decoder.fc.weight", "decoder.fc.bias"]
    assert take(model, "encoder.fc").keys() == params.keys()
    assert torch.equal(take(model, "encoder.fc")["weight"], params["weight"])


def test_biases_share_the_weights_init_bound():
    """torch.nn's Linear, Conv2d and ConvTranspose2d draw the bias from U(-1/√fan_in, 1/√fan_in),
    the weight's bound (fan_in: in, in·k·k, and out·k·k for the transposed (in, out, k, k) layout)."""
    for params, bound in ((nn.linear_init(generator(), 30, 200), 1 / 30 ** 0.5),
                          (nn.conv2d_init(generator(), 3, 200, 4), 1 / (3 * 16) ** 0.5),
                          (nn.conv_transpose2d_init(generator(), 3, 200, 4), 1 / (200 * 16) ** 0.5)):
        for name in ("weight", "bias"):
            largest = params[name].abs().max()
            assert 0.9 * bound < largest <= bound, (name, largest, bound)


def test_layer_defaults_are_torchs():
    """Stride 1 and no padding unless asked, as in torch.nn (the matmul forms included)."""
    x = torch.randn(2, 3, 9, 9, generator=generator(1))
    conv = nn.conv2d_init(generator(2), 3, 5, 3)
    expected = functional_call(tnn.Conv2d(3, 5, 3), conv, (x,))
    for layer in (nn.conv2d, nn.conv2d_as_matmul, nn.image_conv2d):
        torch.testing.assert_close(layer(conv, x), expected, rtol=1e-5, atol=1e-5)
    deconv = nn.conv_transpose2d_init(generator(3), 3, 5, 3)
    expected = functional_call(tnn.ConvTranspose2d(3, 5, 3), deconv, (x,))
    assert expected.shape == (2, 5, 11, 11)
    for layer in (nn.conv_transpose2d, nn.conv_transpose2d_as_matmul, nn.image_conv_transpose2d):
        torch.testing.assert_close(layer(deconv, x), expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_init_is_torchs_identity_scale_and_zero_shift():
    """Fresh params (γ = 1, β = 0) and statistics (0, 1), as torch.nn.BatchNorm2d starts."""
    params, state = nn.batch_norm_init(4)
    module = tnn.BatchNorm2d(4)
    for name in ("weight", "bias"):
        torch.testing.assert_close(params[name], getattr(module, name).detach())
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(state[name], getattr(module, name))
    x = torch.randn(8, 4, 3, 3, generator=generator(1)) * 5 + 2
    y, _ = nn.batch_norm(params, state, x, training=True)
    torch.testing.assert_close(y, module.train()(x))  # standardised per channel, nothing added
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)


def test_spectral_normalize_stays_in_float32_under_bf16_autocast():
    """u is checkpointed state and σ divides every weight: both stay float32 under `--precision bf16`."""
    weight = torch.randn(64, 128, generator=generator(1))
    state = nn.spectral_norm_init(generator(2), weight)
    expected, expected_state = nn.spectral_normalize(weight, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normalized, new_state = nn.spectral_normalize(weight, state)
    assert new_state["u"].dtype == torch.float32 and normalized.dtype == torch.float32
    torch.testing.assert_close(new_state["u"], expected_state["u"])
    torch.testing.assert_close(normalized, expected)


def test_spectral_normalize_is_scale_invariant_down_to_tiny_weights():
    """W / σ(W) does not depend on W's scale; F.normalize's eps (torch's 1e-12) must not bite for a
    layer whose weights are small."""
    weight = torch.randn(16, 8, generator=generator(3))
    state = nn.spectral_norm_init(generator(4), weight)
    expected, expected_state = nn.spectral_normalize(weight, state)
    for scale in (1e-2, 1e-4, 1e-6):
        normalized, new_state = nn.spectral_normalize(scale * weight, state)
        torch.testing.assert_close(normalized, expected, rtol=1e-4, atol=1e-6, msg=str(scale))
        torch.testing.assert_close(new_state["u"], expected_state["u"], rtol=1e-4, atol=1e-6, msg=str(scale))


def test_at_least_float32_promotes_half_precision_and_keeps_float64():
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)):
        t = torch.tensor([1.0, 1 / 3], dtype=dtype)
        out = nn.at_least_float32(t)
        assert out.dtype == expected, dtype
        assert torch.equal(out.double(), t.double()), dtype  # exact: a promotion only
    tiny = torch.tensor([1 + 1e-12], dtype=torch.float64)
    assert nn.at_least_float32(tiny).item() == 1 + 1e-12

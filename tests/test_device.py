"""Which device a command runs on, waiting for it, and the bf16 step wrapper, without a GPU:
torch.cuda's answers are replaced where the choice depends on them."""

import pytest
import torch

from gen import device


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_is_cuda_when_torch_sees_a_gpu_and_the_cpu_otherwise(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert device.resolve_device("auto") == torch.device(expected)
    assert device.resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_and_unknown_devices_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda asked for, but torch sees no CUDA device: use --device cpu"):
        device.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu': use auto, cpu or cuda"):
        device.resolve_device("tpu")


def test_only_cuda_is_waited_for(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(d))
    device.synchronize(torch.device("cpu"))
    assert waited == []
    device.synchronize(torch.device("cuda"))
    assert waited == [torch.device("cuda")]


def test_the_bf16_step_runs_its_matmuls_in_bfloat16_and_logs_float32_metrics():
    def step(state, batch, inputs):
        product = batch @ state["w"]
        return {"w": state["w"] * 1}, {"product_mean": product.mean(), "product_dtype": torch.tensor(0.0)
                                       if product.dtype == torch.bfloat16 else torch.tensor(1.0)}

    state = {"w": torch.ones(4, 3)}
    new_state, metrics = device.autocast_step(step, torch.device("cpu"))(state, torch.ones(2, 4), {})
    assert metrics["product_dtype"].item() == 0.0  # the matmul ran in bfloat16
    assert all(value.dtype == torch.float32 for value in metrics.values())  # a bf16 mean logged as float32
    assert new_state["w"].dtype == torch.float32 and metrics["product_mean"].item() == 4.0

"""Which device a command runs on, and waiting for it: shared by `gen train`, `gen sample` and `gen bench`."""

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cpu" or "cuda"; anything else is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously, so a timer must wait for it first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

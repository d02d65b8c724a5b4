"""Pictures of a run: sample grids, 2D scatter plots and loss curves (matplotlib, Agg backend)."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from torch import Tensor  # noqa: E402


def image_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> None:
    """Tile (N, C, H, W) images in [0, 1] into one PNG, a 1-pixel white border between them."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    padded = torch.ones(rows * columns, channels, height + 1, width + 1)
    padded[:n, :, :height, :width] = images
    grid = rearrange(padded, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=columns)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    if channels == 1:
        plt.imsave(path, grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(path, grid.numpy())


def upscale_for_viewing(height: int) -> int:
    """Small images (8x8 digits) are enlarged so a grid is readable."""
    return max(1, 64 // height)


def scatter(points: Tensor, path: str | Path, reference: Tensor | None = None, title: str = "") -> None:
    """Generated 2D points (blue) over a sample of the real distribution (grey)."""
    figure, axes = plt.subplots(figsize=(5, 5))
    if reference is not None:
        reference = reference.detach().cpu()
        axes.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    points = points.detach().cpu()
    axes.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", label="samples")
    axes.set_aspect("equal")
    axes.legend(loc="upper right", markerscale=4)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def loss_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Every numeric metric logged per step (not rates or positions) against the step."""
    skip = {"step", "epoch", "samples_per_s", "elapsed_s"}
    names = [k for k in history[-1] if k not in skip and isinstance(history[-1][k], (int, float))] if history else []
    figure, axes = plt.subplots(figsize=(6, 4))
    for name in names:
        steps = [row["step"] for row in history if name in row]
        axes.plot(steps, [row[name] for row in history if name in row], label=name)
    axes.set_xlabel("step")
    axes.set_title(title)
    if names:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

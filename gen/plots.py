"""Pictures of a run: sample grids, 2D scatter plots and loss curves, written as PNG files.

Figures are built with matplotlib's object API (`Figure`, saved through the Agg renderer its
`savefig` picks for .png), never pyplot: pyplot keeps every figure in a global registry until it is
closed (a save that raises would leak one per call in a long run), and selecting a backend here
would switch the backend of whatever process imports gen (a notebook's, say). No display is needed.
Sample grids are pixels, not plots: Pillow (which matplotlib brings) writes them, 8 bits a channel.
"""

import math
from pathlib import Path

import torch
from einops import rearrange
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> None:
    """Tile (N, C, H, W) images in [0, 1] (C = 1: grey, 3: RGB) into one PNG, row by row, with a white
    line `scale` pixels wide between neighbours (none around the outside); values outside [0, 1] are
    clamped, NaN is black. Each pixel becomes a `scale` x `scale` block."""
    # Eight bits a channel first: every copy after this one (the padded tiles, the grid, the
    # enlarged picture) takes a byte a value. x ↦ round(255 · clamp(x, 0, 1)).
    pixels = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp_(0, 1).mul_(255).round_()
    pixels = pixels.to(torch.uint8)
    n, channels, height, width = pixels.shape
    rows, columns = grid_layout(n, columns)
    # Each tile carries its white line below and to its right; the last row's and column's are cut
    # off, so a grid is rows·(H + 1) - 1 by columns·(W + 1) - 1 pixels (before scaling).
    padded = torch.full((rows * columns, channels, height + 1, width + 1), 255, dtype=torch.uint8)
    padded[:n, :, :height, :width] = pixels
    grid = rearrange(padded, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=columns)[:-1, :-1].contiguous()
    picture = Image.fromarray(grid[..., 0].numpy() if channels == 1 else grid.numpy())  # mode "L" or "RGB"
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    picture.save(path, format="PNG")


def grid_layout(n: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a grid of n images: as square as it can be unless `columns` is given."""
    columns = columns or math.ceil(math.sqrt(n))
    return math.ceil(n / columns), columns


def image_grid_bytes(n: int, channels: int, height: int, width: int, scale: int = 1) -> int:
    """An upper bound on the memory `image_grid` takes for n images of (channels, height, width),
    beyond the images themselves: one float32 copy of them (4 bytes a value), then in 8 bits the
    images, the padded tiles, the grid and the picture handed to Pillow (a byte a value each, every
    one at most a tile count), and the enlarged picture twice (itself and the PNG encoder's rows)."""
    rows, columns = grid_layout(n)
    tiles = rows * columns * channels * (height + 1) * (width + 1)
    return 4 * n * channels * height * width + 4 * tiles + 2 * tiles * scale * scale


def upscale_for_viewing(side: int) -> int:
    """Small images (8x8 digits) are enlarged so a grid is readable: `side`, the longer of an
    image's height and width, becomes about 64 pixels."""
    return max(1, 64 // side)


def scatter(points: Tensor, path: str | Path, reference: Tensor | None = None, title: str = "") -> None:
    """Generated 2D points (blue) over a sample of the real distribution (grey)."""
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    if reference is not None:
        reference = reference.detach().cpu()
        axes.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    points = points.detach().cpu()
    axes.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", label="samples")
    axes.set_aspect("equal")
    # below the axes, where it cannot hide a mode (grid25's corner ones sat under it)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, markerscale=4, frameon=False)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def loss_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Every numeric metric logged per step (not rates or positions) against the step."""
    skip = {"step", "epoch", "samples_per_s", "elapsed_s"}
    names = [k for k in history[-1] if k not in skip and isinstance(history[-1][k], (int, float))] if history else []
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name in names:
        rows = [row for row in history if name in row]
        steps = [row["step"] for row in rows]
        values = [float(row[name]) if isinstance(row[name], (int, float)) else math.nan for row in rows]
        (line,) = axes.plot(steps, values, label=name)
        # A line is drawn between consecutive finite values only: a value with no finite neighbour
        # (a run's single logged row, or one between NaNs) would not show; mark those with a dot.
        finite = [math.isfinite(value) for value in values]
        alone = [i for i, ok in enumerate(finite)
                 if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])]
        if alone:
            axes.plot([steps[i] for i in alone], [values[i] for i in alone], linestyle="none", marker="o",
                      markersize=4, color=line.get_color())
    axes.set_xlabel("step")
    axes.set_title(title)
    if names:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)

"""gen/plots.py: grids read back pixel by pixel, plots that must survive odd metric series, and no
matplotlib state left behind (figures, the process's backend)."""

import gc
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from gen import plots

ROOT = Path(__file__).resolve().parents[1]


def read_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8: the PNG as a viewer on a white page shows it."""
    image = Image.open(path).convert("RGBA")
    page = Image.new("RGBA", image.size, "white")
    return np.asarray(Image.alpha_composite(page, image).convert("RGB"))


def test_image_grid_places_non_square_rgb_images_row_by_row_with_white_lines_between(tmp_path):
    # 5 images of 3x2 (H x W): ceil(sqrt(5)) = 3 columns, 2 rows, the last row one image short.
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    images = colours[:, :, None, None].expand(5, 3, 3, 2)
    plots.image_grid(images, tmp_path / "grid.png")
    grid = read_rgb(tmp_path / "grid.png")
    # lines only between tiles: 2 rows of 3 + 1 line, 3 columns of 2 + 2 lines
    assert grid.shape == (2 * 3 + 1, 3 * 2 + 2, 3)
    for i, colour in enumerate(colours):
        r, c = divmod(i, 3)
        tile = grid[r * 4:r * 4 + 3, c * 3:c * 3 + 2]
        assert (tile == (colour.numpy() * 255).astype(np.uint8)).all(), f"image {i}"
    assert (grid[3, :] == 255).all() and (grid[:, 2] == 255).all() and (grid[:, 5] == 255).all()
    assert (grid[4:, 6:] == 255).all()  # the empty sixth cell is blank


def test_image_grid_of_one_grey_image_is_that_image_scaled_and_clamped(tmp_path):
    image = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 2.0]]).expand(4, 5)[None, None]  # values outside [0, 1] too
    plots.image_grid(image, tmp_path / "one.png", scale=3)
    grid = read_rgb(tmp_path / "one.png")
    assert grid.shape == (4 * 3, 5 * 3, 3)  # no border around a single image
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()  # grey
    row = grid[0, ::3, 0].astype(int)
    assert row[0] == 0 and row[1] == 0 and abs(row[2] - 128) <= 1 and row[3] == 255 and row[4] == 255


def test_image_grid_draws_nan_pixels_black(tmp_path):
    plots.image_grid(torch.tensor([[[[math.nan, 1.0]]]]), tmp_path / "nan.png")
    assert read_rgb(tmp_path / "nan.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_image_grid_respects_columns(tmp_path):
    plots.image_grid(torch.zeros(3, 1, 2, 2), tmp_path / "row.png", columns=4)
    grid = read_rgb(tmp_path / "row.png")
    assert grid.shape == (2, 4 * 3 - 1, 3)
    assert (grid[:, 9:] == 255).all() and (grid[:, :8:3] == 0).all()


MEASURE_GRID = """
import os, sys, tempfile
import torch
from gen import plots

def status(field):  # kB
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field))

n, channels, height, width, scale = map(int, sys.argv[1:])
with tempfile.TemporaryDirectory() as folder:
    plots.image_grid(torch.rand(4, channels, height, width), os.path.join(folder, "warm.png"), scale=scale)
    images = torch.rand(n, channels, height, width)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from here: an earlier one would hide this call's
    plots.image_grid(images, os.path.join(folder, "grid.png"), scale=scale)
    print((status("VmHWM:") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/status peaks")
@pytest.mark.parametrize("n, channels, height, width, scale", [(1000, 3, 64, 64, 1), (4000, 1, 8, 8, 8)])
def test_image_grid_bytes_bounds_what_a_grid_takes(n, channels, height, width, scale):
    """The estimate `gen sample` checks a picture against, against the peak memory image_grid
    adds in a fresh process (RGB tiles, where the copies of the tiles dominate, and enlarged
    digits, where the picture does); it had missed a float32 copy, 15% low for large tiles."""
    grown = int(subprocess.run([sys.executable, "-c", MEASURE_GRID, *map(str, (n, channels, height, width, scale))],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    estimate = plots.image_grid_bytes(n, channels, height, width, scale)
    assert grown <= estimate < 4 * grown + 10e6


def blue_pixels(path, box) -> int:
    """How many pixels of matplotlib's first colour (tab:blue, #1f77b4) lie in box (rows, columns)."""
    rgb = read_rgb(path)[box].astype(int)
    return int((np.abs(rgb - [0x1F, 0x77, 0xB4]).sum(-1) < 60).sum())


def test_a_one_point_series_is_drawn(tmp_path):
    # One logged row (gen train vae --steps 3): a line through one point draws nothing. The point
    # sits in the middle of the axes, the legend in a corner.
    plots.loss_curves([{"step": 3, "epoch": 0.27, "loss": 41.7, "samples_per_s": 2600.0}], tmp_path / "loss.png")
    assert blue_pixels(tmp_path / "loss.png", np.s_[150:250, 250:400]) > 0


def test_a_point_between_non_finite_values_is_drawn(tmp_path):
    history = [{"step": 1, "loss": math.nan}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": math.inf}]
    plots.loss_curves(history, tmp_path / "loss.png")
    assert blue_pixels(tmp_path / "loss.png", np.s_[150:250, 250:400]) > 0


@pytest.mark.parametrize("history", [
    [],
    [{"step": 1, "loss": math.nan}],
    [{"step": 1, "loss": 1.0}, {"step": 2, "loss": math.inf}, {"step": 3, "loss": -math.inf}],
    [{"step": 1, "loss": None}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}],
])
def test_loss_curves_write_a_png_for_odd_series(tmp_path, history):
    plots.loss_curves(history, tmp_path / "loss.png", title="t")
    assert Image.open(tmp_path / "loss.png").format == "PNG"


def test_a_long_series_is_a_line_without_markers(tmp_path):
    steps = range(1, 101)
    plots.loss_curves([{"step": s, "loss": 1.0} for s in steps], tmp_path / "line.png")
    # a flat line at mid-height, one or two pixels thick: no marker widens it
    rgb = read_rgb(tmp_path / "line.png")
    blue = (np.abs(rgb.astype(int) - [0x1F, 0x77, 0xB4]).sum(-1) < 60)
    rows = np.nonzero(blue[:, 100:400].any(axis=1))[0]
    assert 1 <= len(rows) <= 3


@pytest.mark.parametrize("points", [torch.zeros(0, 2), torch.full((10, 2), math.nan),
                                    torch.tensor([[0.0, 0.0], [math.inf, 1.0]])])
def test_scatter_writes_a_png_for_empty_or_non_finite_points(tmp_path, points):
    plots.scatter(points, tmp_path / "s.png", reference=torch.randn(20, 2), title="t")
    assert Image.open(tmp_path / "s.png").format == "PNG"


def live_figures() -> int:
    gc.collect()
    return sum(isinstance(thing, Figure) for thing in gc.get_objects())


@pytest.mark.parametrize("draw", [lambda path: plots.scatter(torch.zeros(3, 2), path),
                                  lambda path: plots.loss_curves([{"step": 1, "loss": 1.0}], path)])
def test_a_failed_save_leaves_no_figure_behind(tmp_path, draw):
    """A long process (training, a notebook) that draws many plots must not keep their figures,
    including when writing one fails."""
    before = live_figures()
    draw(tmp_path / "a.png")
    with pytest.raises(OSError):
        draw(tmp_path / "missing" / "b.png")
    assert live_figures() == before


def test_importing_and_drawing_leaves_the_process_backend_alone(tmp_path):
    """gen.plots writes files without a display on any backend; it must not switch the backend of
    the process that imports it (a notebook's inline backend, say)."""
    script = (
        "import sys, matplotlib, torch\n"
        "matplotlib.use('svg')\n"
        "from gen import plots\n"
        "plots.image_grid(torch.rand(2, 1, 4, 4), sys.argv[1] + '/g.png')\n"
        "plots.scatter(torch.rand(5, 2), sys.argv[1] + '/s.png')\n"
        "plots.loss_curves([{'step': 1, 'loss': 1.0}], sys.argv[1] + '/l.png')\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DISPLAY", None)  # headless
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    assert all(Image.open(tmp_path / name).format == "PNG" for name in ("g.png", "s.png", "l.png"))


def test_the_scatter_legend_lies_outside_the_axes(tmp_path, monkeypatch):
    """grid25's corner modes sat under a legend drawn inside the axes; it goes below them."""
    drawn = drawn_figure(monkeypatch)
    corners = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])
    plots.scatter(corners, tmp_path / "scatter.png", reference=corners, title="grid25")
    renderer = FigureCanvasAgg(drawn[0]).get_renderer()
    axes = drawn[0].axes[0]
    assert axes.get_legend().get_window_extent(renderer).y1 <= axes.get_window_extent(renderer).y0


def test_a_grid_is_enlarged_by_any_scale_above_one_and_small_images_are_enlarged_to_about_64_pixels(tmp_path):
    plots.image_grid(torch.zeros(1, 1, 2, 3), tmp_path / "two.png", scale=2)
    assert read_rgb(tmp_path / "two.png").shape == (4, 6, 3)
    assert [plots.upscale_for_viewing(side) for side in (8, 28, 32, 100)] == [8, 2, 2, 1]


def drawn_figure(monkeypatch) -> list:
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure) or
                        save(figure, *args, **kwargs))
    return drawn


def test_loss_curves_draw_every_logged_metric_and_no_rate_or_position(tmp_path, monkeypatch):
    drawn = drawn_figure(monkeypatch)
    history = [{"step": s, "epoch": s / 10, "d_loss": 1.0 / s, "g_loss": 2.0 / s, "samples_per_s": 900.0,
                "elapsed_s": float(s)} for s in (1, 2, 3)]
    plots.loss_curves(history, tmp_path / "loss.png")
    axes = drawn[0].axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["d_loss", "g_loss"]
    assert [list(line.get_ydata()) for line in axes.get_lines()] == [[1.0, 0.5, 1 / 3], [2.0, 1.0, 2 / 3]]


def test_scatter_draws_the_data_under_the_samples(tmp_path, monkeypatch):
    drawn = drawn_figure(monkeypatch)
    plots.scatter(torch.ones(3, 2), tmp_path / "s.png", reference=torch.zeros(5, 2))
    axes = drawn[0].axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["data", "samples"]
    assert [len(collection.get_offsets()) for collection in axes.collections] == [5, 3]

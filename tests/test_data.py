"""Data sets: embedded digits, IDX parsing (good and malformed files), toy mixtures, batching."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gen import data
from idx_files import write_idx, write_idx_dir


def test_digits_are_embedded_split_and_scaled():
    digits = data.load("digits")
    assert digits.train.shape == (1500, 1, 8, 8) and digits.test.shape == (297, 1, 8, 8)
    assert digits.train.min() == 0 and digits.train.max() == 1 and digits.train.dtype == torch.float32
    assert sorted(digits.train_labels.unique().tolist()) == list(range(10))
    assert torch.equal(data.load("digits").test, digits.test)  # the split is fixed


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), compress=st.booleans())
@settings(max_examples=25, deadline=None)
def test_idx_round_trip(tmp_path_factory, shape, compress):
    path = tmp_path_factory.mktemp("idx") / ("x.gz" if compress else "x")
    array = torch.randint(0, 256, shape, dtype=torch.uint8)
    write_idx(path, array, compress)
    assert torch.equal(data.read_idx(path), array)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_loads_as_images(tmp_path, compress):
    dataset = data.load(str(write_idx_dir(tmp_path, compress=compress)))
    assert dataset.train.shape == (20, 1, 28, 28) and dataset.test.shape == (10, 1, 28, 28)
    assert 0 <= dataset.train.min() and dataset.train.max() <= 1 and dataset.kind == "image"


def test_idx_pixels_scale_to_the_unit_interval_and_a_raw_file_wins_over_its_gz(tmp_path):
    """Bytes 0..255 become 0..1 (255 is white: 1.0). Where a folder holds both x and x.gz the raw
    one is read (README, Data)."""
    write_idx_dir(tmp_path, compress=True)
    images = torch.tensor([[[0, 51], [255, 128]]]).repeat(20, 1, 1)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images[:n])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.zeros(n))
    dataset = data.load(str(tmp_path))
    assert dataset.train.shape == (20, 1, 2, 2)
    torch.testing.assert_close(dataset.train[0, 0], torch.tensor([[0.0, 51 / 255], [1.0, 128 / 255]]))


@pytest.mark.parametrize("content, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad magic"),
    (b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", "bad magic"),  # the second of the two zero bytes
    (b"\x00\x00\x08\x00\x05", "truncated IDX header"),  # no dimensions: a lone number is no data set
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05", "type code 0x0d"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x09\x05", "header says shape (9,)"),
    (b"\x00\x00", "bad magic"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "header says shape (1,) (1 bytes) but the file holds more"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x00\x00\x00\x00\x1c\x00\x00\x00\x1c", "holds no data"),  # 0 images
    (b"\x00\x00\x08\x03\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x1c", "holds no data"),  # 0 rows
])
def test_malformed_idx_files_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        data.read_idx(path)
    assert "\n" not in str(error.value)


def test_corrupt_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(path)


def test_gzip_with_damaged_compressed_data_is_a_data_error(tmp_path):
    """A flipped byte inside the deflate stream raises zlib.error, which is not an OSError."""
    path = tmp_path / "x.gz"
    write_idx(path, torch.randint(0, 256, (20, 28, 28), generator=torch.Generator().manual_seed(0)), compress=True)
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(data.DataError, match=f"cannot read {path}: .*replace the file with a good copy"):
        data.read_idx(path)


def test_a_small_gzip_that_inflates_past_its_header_is_refused_without_inflating_it(tmp_path):
    """A 20x28x28 header followed by 64 MiB of zeros (65 KB compressed): read_idx stops one byte past
    the 15,680 bytes the header promises, instead of inflating it all."""
    import gzip
    import tracemalloc
    header = bytes([0, 0, 8, 3]) + (20).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb") as bomb:
        bomb.write(header)
        for _ in range(64):
            bomb.write(bytes(1 << 20))
    tracemalloc.start()  # Python's own allocations, where inflated bytes would land
    try:
        with pytest.raises(data.DataError, match="header says shape"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_a_file_given_as_the_data_directory_is_named_as_a_file(tmp_path):
    write_idx_dir(tmp_path)
    with pytest.raises(data.DataError, match="is a file, not a directory"):
        data.load(str(tmp_path / "train-images-idx3-ubyte"))


def test_missing_files_and_unknown_names_are_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="mnist not found"):
        data.load("mnist", data_dir=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(data.DataError, match="missing train-labels"):
        data.load(str(tmp_path))
    with pytest.raises(data.DataError, match="unknown data set 'nope'"):
        data.load("nope")


def test_mismatched_image_and_label_counts(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(3))
    with pytest.raises(data.DataError, match="do not match"):
        data.load(str(tmp_path))


def test_train_and_test_images_of_different_sizes(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros(10, 8, 8))
    with pytest.raises(data.DataError, match="the train images are 28x28 but the test images 8x8"):
        data.load(str(tmp_path))


@pytest.mark.skipif(not data.FASHION_MNIST_SYSTEM_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_is_found_where_debian_puts_it():
    dataset = data.load("fashion-mnist")
    assert dataset.train.shape == (60000, 1, 28, 28) and dataset.test.shape == (10000, 1, 28, 28)
    assert dataset.train_labels.bincount().tolist() == [6000] * 10


def test_mixtures_have_the_specified_modes_and_spread():
    ring = data.load("ring8")
    radii = ring.train.norm(dim=1)
    assert abs(radii.mean().item() - 2) < 0.01 and ring.modes.shape == (8, 2) and ring.mode_std == 0.02
    grid = data.load("grid25")
    assert set(grid.modes.flatten().tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0} and grid.mode_std == 0.05
    nearest = torch.cdist(grid.train, grid.modes).min(1).values
    assert nearest.max() < 0.05 * 6  # every point within 6 std of a mode
    for name in ("moons", "swissroll"):
        points = data.load(name)
        assert points.train.shape == (100_000, 2) and torch.isfinite(points.train).all()


def test_toy_data_follow_the_seed():
    assert torch.equal(data.load("moons", seed=3).train, data.load("moons", seed=3).train)
    assert not torch.equal(data.load("moons", seed=3).train, data.load("moons", seed=4).train)


def test_batches_are_full_shuffled_deterministic_and_resumable():
    x = torch.arange(10).float()
    epoch0 = list(data.batches(x, 3, seed=0, epoch=0))
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)  # ragged last batch dropped
    assert len(torch.cat(epoch0).unique()) == 9
    assert all(torch.equal(a, b) for a, b in zip(epoch0, data.batches(x, 3, seed=0, epoch=0)))
    assert not torch.equal(torch.cat(epoch0), torch.cat(list(data.batches(x, 3, seed=0, epoch=1))))
    assert torch.equal(next(data.batches(x, 3, seed=0, epoch=0, start=2)), epoch0[2])
    with pytest.raises(data.DataError, match="exceeds"):
        next(data.batches(x, 11, seed=0, epoch=0))
    assert [len(b) for b in data.batches(x, 10, seed=0, epoch=0)] == [10]  # the whole set is one batch

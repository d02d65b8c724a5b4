"""Checkpoints: round trip, atomic replacement, and a one-line error for every bad file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gen import checkpoint


def make_state():
    return {"params": {"encoder.fc.weight": torch.randn(3, 4), "encoder.fc.bias": torch.randn(3)},
            "opt_state": {"count": torch.tensor(7), "mu": {"encoder.fc.weight": torch.zeros(3, 4)}}}


META = {"model": "vae", "config": {"model": "vae", "lr": 1e-3}, "step": 7, "shape": [1, 8, 8], "data_kind": "image"}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "run" / "checkpoint.safetensors"
    state = make_state()
    checkpoint.save(path, state, META)
    return path, state


def test_round_trip_keeps_every_tensor_and_the_metadata(saved):
    path, state = saved
    loaded, metadata = checkpoint.load(path, model="vae")
    assert torch.equal(loaded["params"]["encoder.fc.weight"], state["params"]["encoder.fc.weight"])
    assert loaded["opt_state"]["count"].item() == 7 and loaded["opt_state"]["count"].dtype == torch.int64
    assert metadata["step"] == 7 and metadata["config"]["lr"] == 1e-3
    assert metadata["torch_version"] == torch.__version__ and "gen_version" in metadata
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_conform_restores_key_order_and_rejects_other_shapes(saved):
    path, state = saved
    loaded, _ = checkpoint.load(path)
    conformed = checkpoint.conform(path, loaded, state)
    assert list(conformed) == list(state) and list(conformed["params"]) == list(state["params"])
    other = make_state()
    other["params"]["encoder.fc.weight"] = torch.zeros(5, 4)
    with pytest.raises(checkpoint.CheckpointError, match="needs \\(5, 4\\)"):
        checkpoint.conform(path, loaded, other)
    del other["params"]["encoder.fc.bias"]
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.conform(path, loaded, other)
    # a state saved in another precision would resume silently in it: the run's dtype is asked for
    other = make_state()
    other["params"]["encoder.fc.weight"] = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(checkpoint.CheckpointError, match="float64"):
        checkpoint.conform(path, loaded, other)


def test_failed_write_leaves_the_old_checkpoint_intact(saved, monkeypatch):
    path, state = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, make_state(), {**META, "step": 8})
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


def test_write_text_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """The run's JSON files and the bench's results are written the same atomic way."""
    path = tmp_path / "results.json"
    checkpoint.write_text(path, "old\n")
    checkpoint.write_text(path, "new\n")
    assert path.read_text() == "new\n" and list(tmp_path.iterdir()) == [path]

    real_write = type(path).write_text

    def crash(self, text, *args, **kwargs):
        real_write(self, text[:2])
        raise OSError("disk full")
    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError):
        checkpoint.write_text(path, "newer\n")
    assert path.read_text() == "new\n" and list(tmp_path.iterdir()) == [path]


def test_replacing_writes_through_links_refuses_non_files_and_names_the_file_asked_for(tmp_path, monkeypatch):
    import errno
    import os
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old\n")
    link.symlink_to(target)
    checkpoint.write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=f"cannot write {fifo}: it is not a regular file \\(a device, pipe or socket\\)"):
        checkpoint.write_text(fifo, "x")
    with pytest.raises(OSError, match=f"cannot write {tmp_path}: it is a directory"):
        checkpoint.write_text(tmp_path, "x")
    long_name = tmp_path / ("r" * 245 + ".json")  # 250 bytes: a legal name, whose temporary must be shorter
    checkpoint.write_text(long_name, "long\n")
    assert long_name.read_text() == "long\n"
    wide_name = tmp_path / ("\N{GRINNING FACE}" * 62 + ".json")  # 253 bytes in 67 characters
    checkpoint.write_text(wide_name, "wide\n")
    assert wide_name.read_text() == "wide\n"
    under_a_file = target / "x.json"  # the temporary cannot even be removed: still the target's name
    with pytest.raises(OSError, match=f"^cannot write {under_a_file}: Not a directory"):
        checkpoint.write_text(under_a_file, "x")

    def read_only(source, destination):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source), str(destination))
    monkeypatch.setattr(checkpoint.os, "replace", read_only)
    with pytest.raises(OSError) as error:
        checkpoint.write_text(target, "newer\n")
    assert str(error.value).startswith(f"cannot write {target}: Read-only file system")
    assert ".tmp" not in str(error.value) and target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.json", "link.json", "pipe.json",
                                                                  long_name.name, wide_name.name])


def test_refuse_to_replace_keeps_checkpoints_run_files_and_non_files(saved, tmp_path):
    """The one rule every gen writer follows, on the real target (a link is followed): a checkpoint
    and a run folder's own files are never replaced, nor a directory or device; anything else is."""
    path, _ = saved
    run = path.parent
    link = tmp_path / "view.safetensors"
    link.symlink_to(path)
    for given in (path, link):
        with pytest.raises(ValueError, match=f"^--out {given} is a gen checkpoint, which the samples would "
                                             "replace: give another file name$"):
            checkpoint.refuse_to_replace(given, "--out", "the samples")
    with pytest.raises(OSError, match=f"^cannot write {tmp_path}: it is a directory; give the path of a file"):
        checkpoint.refuse_to_replace(tmp_path, "--out", "the samples")
    for name in checkpoint.RUN_FILES:
        (run / name).write_text("mine\n")
        with pytest.raises(ValueError, match=f"^--json {run / name} is a gen run's own {name}, which the results "
                                             "would replace: give another file name$"):
            checkpoint.refuse_to_replace(run / name, "--json", "the results")
    # a file of the same name outside a run folder, a new file and a plain safetensors file are replaced
    (tmp_path / "metrics.jsonl").write_text("mine\n")
    save_file({"samples": torch.zeros(2)}, tmp_path / "raw.safetensors")
    for given in (tmp_path / "metrics.jsonl", tmp_path / "new.png", tmp_path / "raw.safetensors"):
        assert checkpoint.refuse_to_replace(given, "--out", "the samples") == given.resolve()


def test_a_symlinked_checkpoint_is_saved_and_synced_in_its_targets_folder(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "checkpoint.safetensors"
    checkpoint.save(target, make_state(), {**META, "step": 1})
    link = tmp_path / "run" / "checkpoint.safetensors"
    link.symlink_to(target)
    synced = []
    monkeypatch.setattr(checkpoint, "_fsync_directory", synced.append)
    checkpoint.save(link, make_state(), {**META, "step": 2})
    assert link.is_symlink() and checkpoint.load(target)[1]["step"] == 2
    assert synced == [tmp_path / "elsewhere"]  # the rename's folder is the one made durable


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The new file is fsynced, then renamed over the old one, then its folder is fsynced: after a
    power loss the name points at the old checkpoint or a whole new one, never at unwritten data."""
    events = []
    real_fsync, real_replace = checkpoint.os.fsync, checkpoint.os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    monkeypatch.setattr(checkpoint, "_fsync_directory", lambda folder: events.append("fsync folder"))
    checkpoint.save(tmp_path / "checkpoint.safetensors", make_state(), META)
    assert events == ["fsync", "replace", "fsync folder"]


DAMAGED_METADATA = {"config-not-object": {"config": "vae"}, "no-shape": {"shape": None},
                    "shape-of-strings": {"shape": ["1", "8", "8"]}, "step-not-int": {"step": "7"},
                    "step-bool": {"step": True}, "epoch-not-number": {"epoch": "one"}, "negative-step": {"step": -1}}


def corrupt(path, kind):
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) - 20])
    elif kind == "header-only":
        path.write_bytes(raw[:30])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "foreign":
        save_file({"weight": torch.zeros(2)}, path)
    elif kind == "bad-json":
        save_file({"w": torch.zeros(2)}, path, metadata={"format": "gen-checkpoint", "format_version": "1",
                                                        "gen": "{not json"})
    elif kind == "no-config":
        save_file({"w": torch.zeros(2)}, path, metadata={"format": "gen-checkpoint", "format_version": "1",
                                                        "gen": json.dumps({"model": "vae"})})
    elif kind in DAMAGED_METADATA:
        save_file({"w": torch.zeros(2)}, path, metadata={"format": "gen-checkpoint", "format_version": "1",
                                                        "gen": json.dumps({**META, **DAMAGED_METADATA[kind]})})
    elif kind in ("nested-json", "huge-integer"):  # json.loads: RecursionError; ValueError past 4,300 digits
        text = "[" * 100_000 + "]" * 100_000 if kind == "nested-json" else json.dumps(META)[:-1] + ', "x": 1' + "0" * 5000 + "}"
        save_file({"w": torch.zeros(2)}, path, metadata={"format": "gen-checkpoint", "format_version": "1", "gen": text})
    elif kind in ("tensor-and-folder", "folder-then-tensor", "nan"):
        tensors = {"params/w": torch.zeros(2), "opt_state/count": torch.tensor(3)}
        tensors.update({"tensor-and-folder": {"params": torch.zeros(3)},
                        "folder-then-tensor": {"opt_state/count/x": torch.zeros(1)},
                        "nan": {"params/w": torch.tensor([0.0, float("nan")])}}[kind])
        save_file(tensors, path, metadata={"format": "gen-checkpoint", "format_version": "1", "gen": json.dumps(META)})
    elif kind == "future-version":
        save_file({"w": torch.zeros(2)}, path, metadata={"format": "gen-checkpoint", "format_version": "99",
                                                        "gen": json.dumps(META)})


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated or corrupt"), ("header-only", "truncated or corrupt"), ("empty", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"), ("foreign", "not a gen checkpoint"), ("bad-json", "damaged metadata"),
    ("no-config", "incomplete metadata \\('config' missing or not a JSON object\\)"),
    ("config-not-object", "'config' missing or not a JSON object"), ("no-shape", "'shape' missing or not a list"),
    ("shape-of-strings", "'shape' is not a list of positive sizes"), ("step-not-int", "'step' missing or not an integer"),
    ("step-bool", "'step' missing or not an integer"),
    ("epoch-not-number", "'epoch' is not a number"), ("negative-step", "a negative 'step'"),
    ("future-version", "checkpoint format 99"), ("nested-json", "damaged metadata"), ("huge-integer", "damaged metadata"),
    ("tensor-and-folder", "its tensor names do not form a state \\('params/w' lies under 'params', which is a tensor\\)"),
    ("folder-then-tensor", "its tensor names do not form a state \\('opt_state/count/x' lies under 'count'"),
    ("nan", "'params/w' holds NaN or infinite values, which gen never saves"),
])
def test_bad_files_get_one_line_errors(saved, kind, message):
    path, _ = saved
    corrupt(path, kind)
    with pytest.raises(checkpoint.CheckpointError, match=message) as error:
        checkpoint.load(path)
    assert "\n" not in str(error.value)


def test_missing_directory_and_wrong_model(saved, tmp_path):
    path, _ = saved
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="not a file"):
        checkpoint.load(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'vae' model, not 'dcgan'"):
        checkpoint.load(path, model="dcgan")


def test_an_unreadable_checkpoint_is_named_as_such(saved, monkeypatch):
    """safetensors reports a file it may not read as "No such file or directory"; the check before it
    says what is wrong. (Simulated: the tests run as root, whom permissions do not stop.)"""
    path, _ = saved

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot read {path} \\(Permission denied\\): check its "
                                                         "permissions"):
        checkpoint.load(path)


def test_a_written_file_gets_the_permissions_a_plain_write_would(tmp_path):
    """safetensors creates its file 0600, which left checkpoints unreadable to the rest of a group
    sharing runs: a new file gets 0666 less the umask, a replaced one keeps its own bits."""
    import os
    import stat
    umask = os.umask(0o027)
    try:
        path = tmp_path / "checkpoint.safetensors"
        checkpoint.save(path, make_state(), META)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        path.chmod(0o604)
        checkpoint.save(path, make_state(), META)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
        checkpoint.write_text(tmp_path / "summary.json", "{}")
        assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o640
    finally:
        os.umask(umask)

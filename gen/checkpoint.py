"""Checkpoints: one safetensors file holding a whole training state, never pickle.

The state tree (params, optimizer state, model state such as batch-norm
statistics) is flattened to "/"-joined names. The safetensors header's string
metadata carries `format` ("gen-checkpoint"), its version, and `gen`: a JSON
object with the model name, the full config, the step and data position, the
seed (all randomness derives from it and the step, so that is the RNG state),
and the gen and torch versions.

Writes are atomic: the file is written beside its destination, flushed to disk,
then renamed over it, so a crash leaves either the old checkpoint or the new
one, never half of one. Every way a load can fail raises `CheckpointError`
with a one-line message.
"""

import json
import math
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import gen
from gen.tree import Tree, flatten, tree_map, unflatten

FORMAT = "gen-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


FILE_NAME = "checkpoint.safetensors"  # a run folder's checkpoint (gen/train.py)


def path_of(source: str | Path) -> Path:
    """The checkpoint `source` names: a run folder's, or the file itself (what sample and info take)."""
    source = Path(source)
    return source / FILE_NAME if source.is_dir() else source


def save(path: str | Path, state: Tree, metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = flatten(tree_map(lambda t: t.detach().to("cpu").contiguous(), state))
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gen": json.dumps({**metadata, "gen_version": gen.__version__, "torch_version": torch.__version__}),
    }
    with replacing(path) as temporary:
        save_file(tensors, temporary, metadata=header)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(temporary.parent)  # where the rename happened (a symlinked checkpoint's target folder)


def replace_target(path: str | Path) -> Path:
    """The file that replacing `path` replaces: `path` itself, or the file a symlink points to
    (the link stays). An OSError naming `path` if that is a directory, device, pipe or socket,
    which a rename would destroy (`--json /dev/null` once turned /dev/null into a file)."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        what = "a directory" if target.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OSError(f"cannot write {path}: it is {what}; give the path of a file")
    return target


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")  # what a run folder holds beside its checkpoint


def refuse_to_replace(path: str | Path, option: str, replacement: str) -> Path:
    """The file that writing `path` replaces, once it is known not to be one gen keeps: a gen
    checkpoint (a training state) or a run folder's own files beside its checkpoint (its settings
    and log) raise a one-line ValueError naming `option` (the flag that gave `path`, e.g. "--out")
    and `replacement` (what would be written, e.g. "the samples"); a directory, device, pipe or
    socket, replace_target's OSError. Writers call it before their work and again just before the
    rename: a run may save there meanwhile."""
    target = replace_target(path)
    # The real target, not the link: a link named like a new file still replaces what it points to.
    if target.name in RUN_FILES and is_checkpoint(target.parent / FILE_NAME):
        raise ValueError(f"{option} {path} is a gen run's own {target.name}, which {replacement} would replace: "
                         "give another file name")
    if is_checkpoint(target):
        raise ValueError(f"{option} {path} is a gen checkpoint, which {replacement} would replace: "
                         "give another file name")
    return target


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block
    ends, removed if it raises, so no reader or crash sees half a file. It keeps `path`'s suffix,
    for writers that pick the format by it (matplotlib)."""
    target = replace_target(path)
    # Cut in bytes, so that the temporary name stays within the 255-byte limit on file names.
    stem, suffix = (os.fsencode(part)[:limit].decode(errors="ignore")
                    for part, limit in ((target.stem, 64), (target.suffix, 16)))
    temporary = target.with_name(f".{stem}.{os.getpid()}.tmp{suffix}")
    try:
        yield temporary
        try:  # safetensors creates its file 0600: the replacement gets the permissions a plain write would
            os.chmod(temporary, _permissions_for(target))
        except OSError:  # a file system without Unix permissions
            pass
        os.replace(temporary, target)
    except OSError as error:  # named by the file asked for, not the temporary one
        raise OSError(f"cannot write {path}: {error.strerror or error}; check that its folder is writable "
                      "and has space") from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # its folder is the problem (not a directory, ...): the error above says so
            pass


def _permissions_for(target: Path) -> int:
    """The permission bits of `target` if it exists (a replaced file keeps them), else what open()
    gives a new file: 0o666 less the process's umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        pass
    try:  # Linux 4.7+ shows the umask without changing it
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # reading it means setting it: put it straight back
        os.umask(umask)
    return 0o666 & ~umask


def json_safe(value):
    """`value` with every non-finite float as None: JSON has no NaN or Infinity (Python writes them,
    strict parsers refuse them), and a diverged metric or a bench step check of inf is what most
    needs reading."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text` atomically (a run's JSON files, the bench's results)."""
    with replacing(path) as temporary:
        temporary.write_text(text)


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a file whose safetensors header names it a gen checkpoint (a cheap
    header read: writers use it to refuse to overwrite a training state)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata alone, without reading the tensors."""
    return _open(Path(path))[1]


def load(path: str | Path, model: str | None = None) -> tuple[Tree, dict]:
    """(state tree, metadata); with `model`, also check the checkpoint is of that model."""
    path = Path(path)
    tensors, metadata = _open(path, read_tensors=True)
    if model is not None and metadata.get("model") != model:
        raise CheckpointError(f"{path} holds a '{metadata.get('model')}' model, not '{model}': "
                              "use a checkpoint of the same model or another --out folder")
    try:
        state = unflatten(tensors)
    except ValueError as error:
        raise CheckpointError(f"{path} is damaged: its tensor names do not form a state ({error}); "
                              "use another checkpoint") from None
    # gen never saves a NaN or infinite state (gen/train.py), so one here was written by something else.
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} is damaged: '{name}' holds NaN or infinite values, which gen never "
                                  "saves; use another checkpoint")
    return state, metadata


def conform(path: str | Path, state: Tree, template: Tree) -> Tree:
    """`state` in the key order of a freshly built `template`, after checking that
    every tensor name, shape and dtype agree (Dynamo guards on key order, so a
    resumed state must be laid out exactly like a fresh one)."""
    loaded, expected = flatten(state), flatten(template)
    if loaded.keys() != expected.keys():
        missing = sorted(expected.keys() - loaded.keys())[:3]
        extra = sorted(loaded.keys() - expected.keys())[:3]
        raise CheckpointError(f"{path} does not match this model's configuration (missing {missing}, "
                              f"unexpected {extra}): resume with the config it was trained with")
    for name, tensor in loaded.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"{path}: '{name}' is {tuple(tensor.shape)} {tensor.dtype} but this "
                                  f"configuration needs {tuple(expected[name].shape)} {expected[name].dtype}: "
                                  "resume with the config it was trained with")
    return unflatten({name: loaded[name].to(expected[name].device) for name in expected})


def _open(path: Path, read_tensors: bool = False) -> tuple[dict, dict]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path or train a model first")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass a checkpoint file or a run folder")
    try:  # safetensors reports an unreadable file as "No such file or directory"
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CheckpointError(f"cannot read {path} ({error.strerror}): check its permissions") from None
    try:
        tensors = load_file(path) if read_tensors else {}
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({reason}): it may be "
                              "truncated or corrupt; use another checkpoint") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a gen checkpoint: pass a file written by "
                              "gen train")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {header.get('format_version')}, this gen reads "
                              f"{FORMAT_VERSION}: use a matching gen version")
    try:
        metadata = json.loads(header["gen"])
    # ValueError: not JSON, or an integer past Python's 4,300 digits; RecursionError: nested too deep
    except (KeyError, ValueError, RecursionError):
        raise CheckpointError(f"{path} has damaged metadata: use another checkpoint") from None
    problem = _metadata_problem(metadata)
    if problem:
        raise CheckpointError(f"{path} has incomplete metadata ({problem}): use another checkpoint")
    return tensors, metadata


# What gen train writes into every checkpoint, and what sampling, `gen info` and a resume read back.
REQUIRED_METADATA = {"model": str, "config": dict, "step": int, "shape": list, "data_kind": str}


def _metadata_problem(metadata) -> str | None:
    """Why `metadata` cannot be a gen train checkpoint's, or None."""
    if not isinstance(metadata, dict):
        return "not a JSON object"
    for name, kind in REQUIRED_METADATA.items():
        value = metadata.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = {str: "a string", dict: "a JSON object", int: "an integer", list: "a list"}[kind]
            return f"'{name}' missing or not {wanted}"
    if metadata["step"] < 0:
        return "a negative 'step'"
    if not metadata["shape"] or not all(type(side) is int and side > 0 for side in metadata["shape"]):
        return "'shape' is not a list of positive sizes"
    sides = {"image": 3, "points": 1}.get(metadata["data_kind"])  # (C, H, W) images, (2,) points
    if sides is None:
        return f"'data_kind' {metadata['data_kind']!r}, neither 'image' nor 'points'"
    if len(metadata["shape"]) != sides:
        return f"'shape' {metadata['shape']} for {metadata['data_kind']} data, whose shape has {sides} sizes"
    if not isinstance(metadata.get("epoch", 0.0), (int, float)) or isinstance(metadata.get("epoch"), bool):
        return "'epoch' is not a number"
    return None


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)

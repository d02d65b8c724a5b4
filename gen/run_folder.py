"""A run folder: what `gen train` writes, and the rules that keep it whole.

    runs/NAME/
      config.json          the resolved Config
      checkpoint.safetensors   whole training state + metadata (gen/checkpoint.py)
      metrics.jsonl        one JSON object per log step and per evaluation
      samples.png          a grid of samples (a scatter plot for 2D data)
      loss.png             the logged losses against the step
      samples/step_N.png   fixed-noise samples every --sample-every steps
      summary.json         the final metrics, evaluation and timings
      .lock                flock'ed while a process trains here (`lock`)

The rules: a new run starts in a new or empty folder (or one a run left before
its first checkpoint), a resume needs the folder's checkpoint (`check`); one
process writes into a folder at a time (`lock`); every file is replaced whole,
never half-written (gen.checkpoint.write_text and replacing); and on resume
the log keeps only the rows up to the checkpoint's step (`restart_metrics`),
so it never holds steps the state does not.
"""

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gen import checkpoint
from gen.config import Config

CHECKPOINT = checkpoint.FILE_NAME
CONFIG, METRICS, SUMMARY = checkpoint.RUN_FILES  # the files gen sample and gen bench --json never replace
LOCK = ".lock"


def check(out: Path, resume: bool) -> None:
    """A new run needs a new or empty folder (or one a run left before its first checkpoint);
    a resume needs the folder's checkpoint."""
    checkpoint_path = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder: choose a directory")
    if checkpoint_path.exists() and not resume:
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    if not resume and out.is_dir() and any(out.iterdir()) and not _unsaved_run(out):
        # Its config.json, metrics.jsonl or pictures may be someone else's files.
        raise ValueError(f"--out {out} is not empty: a new run needs a new or empty folder; choose another --out")
    if resume and not checkpoint_path.exists():
        raise ValueError(f"nothing to resume: {checkpoint_path} does not exist")


def create(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the run folder {out} ({error.strerror}): choose another --out") from None


@contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder `out` while a run writes into it: a second gen
    process training into the same folder (a new run or a resume) stops with one line instead of
    interleaving its log and checkpoints with this one's. The kernel drops an flock when its
    process ends, however it ends, so a killed run leaves no stale lock (the empty file stays).
    Where there is no flock (Windows, some network file systems) runs go unguarded."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None:  # outside the except clause: errors in the run must not read as this one's
        yield
        return
    lock_path = out / LOCK
    try:  # read-only: flock needs no write access, and another user's run may have made the file;
        # not through a symbolic link, which would create a file outside the run folder
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as error:
        raise ValueError(f"cannot open the run folder's lock file {lock_path} ({error.strerror}): remove it if it "
                         "is not an empty file gen made, else check the folder's permissions") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another gen process is training in {out}: wait for it to finish, or choose "
                             "another --out") from None
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(descriptor)


def _unsaved_run(out: Path) -> bool:
    """Whether `out` holds only what a gen run writes before its first checkpoint (its config.json,
    metrics.jsonl, samples/): a run that diverged, ran out of memory or was killed early, which a
    new run may take over. Anything else in it, or a config.json gen did not write, is not that."""
    names = {entry.name for entry in out.iterdir()}
    if not names <= {CONFIG, METRICS, "samples", LOCK}:
        return False
    if names <= {LOCK}:  # a run stopped before it wrote anything
        return True
    try:
        written = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return False
    known = set(Config.__dataclass_fields__)
    return isinstance(written, dict) and {"model", "data", "seed"} <= written.keys() <= known


# --- the metrics log -----------------------------------------------------------------


def append_metrics(out: Path, row: dict, history: list[dict]) -> None:
    """One row more in metrics.jsonl (and in `history`, the rows kept in memory)."""
    history.append(row)
    with open(out / METRICS, "a") as handle:
        handle.write(json.dumps(checkpoint.json_safe(row), allow_nan=False) + "\n")  # a diverged NaN as null


def restart_metrics(out: Path, start_step: int) -> list[dict]:
    """Keep the log rows up to the checkpoint's step (a crash may have logged past it)."""
    path = out / METRICS
    if not path.exists():
        return []
    if not path.is_file():
        raise ValueError(f"{path} is not a file, so the run's log cannot be kept: move it aside and resume again")
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        # a line cut short by a crash (JSONDecodeError), not UTF-8, an integer past 4,300 digits
        # (ValueError), or nested too deep to parse (RecursionError)
        except (ValueError, RecursionError):
            continue
        if _is_metrics_row(row) and row["step"] <= start_step:
            # An older gen logged an undefined reverse KL as Infinity: kept rows lose non-finite
            # fields, as the metric is now left out, so the rewritten log is strict JSON.
            rows.append({name: value for name, value in row.items()
                         if not (isinstance(value, float) and not math.isfinite(value))})
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    checkpoint.write_text(path, text)
    return rows


def _is_metrics_row(row) -> bool:
    """Whether a parsed line is one gen logs: an object of numbers with a step of at least 1, every
    integer within int64. Anything else (an edited or foreign line) would break the loss plot and
    the summary (an integer too large for a float stops matplotlib), and is dropped."""
    def number(value) -> bool:
        return type(value) is float or (type(value) is int and -2**63 <= value < 2**63)
    return (isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 1
            and all(number(value) for value in row.values()))


def write_json(path: Path, value: dict) -> None:
    """config.json and summary.json: strict JSON (a NaN or infinity as null), replaced whole."""
    checkpoint.write_text(path, json.dumps(checkpoint.json_safe(value), indent=2, allow_nan=False) + "\n")

"""What a run reports: the rich table, each mode's samples/s relative to the peer, and the
checks on the --json file it is written to (the JSON is made strict by
gen.checkpoint.json_safe, which the run log uses too)."""

import os
import sys
import tempfile
from pathlib import Path

from gen import checkpoint, mkl_amd


def speedups(results: list[dict], reference: str = "module") -> dict[tuple, float]:
    """(model, batch, mode) -> samples/s relative to the reference mode of the same row group."""
    ok = [r for r in results if r.get("error") is None]
    base = {(r["model"], r["batch_size"]): r["samples_per_s"] for r in ok if r["mode"] == reference}
    return {(r["model"], r["batch_size"], r["mode"]): r["samples_per_s"] / base[(r["model"], r["batch_size"])]
            for r in ok if (r["model"], r["batch_size"]) in base}


def print_table(results: list[dict], machine_info: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ratio = speedups(results)
    title = "gen bench"
    if machine_info:
        title += f" — {machine_info['cpu']}, {machine_info['cores']} cores, torch {machine_info['torch']}"
        if machine_info.get("gpu"):
            title += f", {machine_info['gpu']}"
        if machine_info.get("mkl_kernels"):
            title += f", MKL {mkl_amd.short_code_path(machine_info['mkl_kernels'])} kernels"
    table = Table(title=title)
    for column in ("model", "batch", "mode", "samples/s (min–max)", "× module", "ms/step", "GFLOP/s",
                   "% peak", "compile cold/warm s", "first call s", "peak MB"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")

    def number(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in results:
        if r.get("error") is not None:
            table.add_row(r["model"], str(r["batch_size"]), r["mode"], f"[red]{r['error'][:80]}[/red]",
                          *[""] * 7)
            continue
        key = (r["model"], r["batch_size"], r["mode"])
        compile_cell = (f"{r['cold_compile_s']:.1f} / {r['warm_compile_s']:.1f}"
                        if r["cold_compile_s"] is not None else "")
        table.add_row(r["model"], str(r["batch_size"]), r["mode"],
                      f"{r['samples_per_s']:,.0f} ({r['samples_per_s_min']:,.0f}–{r['samples_per_s_max']:,.0f})",
                      f"{ratio[key]:.2f}" if key in ratio else "", f"{r['ms_per_step']:.2f}",
                      number(r["gflops"], ".1f"), number(r["pct_of_peak"], ".0f") + ("%" if r["pct_of_peak"] else ""),
                      compile_cell, f"{r['first_call_s']:.1f}", f"{r['peak_memory_mb']:.0f}")
    # Piped into a log, rich would squeeze the eleven columns into 80 ("mod…"): a log keeps them
    # all. (rich reads COLUMNS itself; a terminal has its own width.)
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    console.print(table)
    if results:
        kind = "CUDA max allocated" if results[0]["device"] == "cuda" else "process max RSS so far (CPU)"
        peaks = [r["peak_gflops"] for r in results if r.get("peak_gflops") is not None]  # none in rows never run
        console.print(f"peak MB: {kind}" + (f"; float32 matmul peak {peaks[0]:.1f} GFLOP/s" if peaks else ""))


def json_target(json_path: str) -> Path:
    """The file --json names, checked before the run: a new or regular file that is not a gen
    checkpoint, in a directory that takes new files. A symbolic link is followed: the file it
    points at is replaced and the link kept."""
    if not json_path:
        raise ValueError("--json needs a file name, e.g. --json bench.json")
    given = Path(json_path)
    refuse_to_replace(json_path)
    try:
        target = given.resolve()
    except (OSError, RuntimeError) as error:  # a loop of symbolic links
        raise ValueError(f"--json {json_path} cannot be followed ({error}): choose another path") from None
    if not target.parent.is_dir():
        if target.parent.exists():
            raise ValueError(f"--json: {target.parent} is not a directory: write into a directory")
        raise ValueError(f"--json: the directory {target.parent} does not exist: create it or write elsewhere")
    try:  # the results are written beside it, then renamed over it: the directory must take a new file
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as error:
        raise ValueError(f"--json {json_path} cannot be written ({error.strerror or error}): "
                         "choose another path") from None
    return target


def refuse_to_replace(json_path: str) -> None:
    """Refuse an existing --json that the results must not replace: one of the process's streams
    (/dev/stdout, /proc/self/fd/1), then what no gen writer replaces (checkpoint.refuse_to_replace:
    a device, pipe or socket such as /dev/null, a gen checkpoint, a run folder's own files)."""
    parts = Path(os.path.abspath(json_path)).parts
    # The process's own streams: /dev/stdout redirected to a log (`>> log.txt`) resolves to that
    # file, which the results, renamed over it, would replace whole.
    if parts[1:3] in (("dev", "stdout"), ("dev", "stderr"), ("dev", "stdin"), ("dev", "fd")) or \
            (parts[1:2] == ("proc",) and "fd" in parts[2:4]):
        raise ValueError(f"--json {json_path} is one of the process's streams, not a file: give a file name, "
                         "e.g. bench.json")
    try:
        checkpoint.refuse_to_replace(json_path, "--json", "the results")
    except OSError as error:
        raise ValueError(f"--json: {error}, e.g. bench.json") from None

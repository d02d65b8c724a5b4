"""What a run reports: the rich table and each mode's samples/s relative to the peer (the
JSON is made strict by gen.checkpoint.json_safe, which the run log uses too)."""

import os
import sys

from gen import mkl_amd


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

"""The CUDA benchmark as one unattended run (bench/cuda.sh calls this): every model, the
five modes, GPU batch sizes, finished within a fixed number of seconds, whatever fails.

    python bench/cuda.py OUT_DIR [--total SECONDS] [--device cuda] [--steps N] [--repeats R]

The (model, batch size) groups run in priority order (the issue's targets first,
the large batches last) in one process — one Inductor worker pool and one
CUDA context for all of them, which saves about 15 s a model over a process
each. The harness itself turns a failing mode into an error row and stops
starting new work `--margin` seconds before `--total`; this driver covers what
the harness cannot: a crash of the whole process (a segfault, a sticky CUDA
error that kills it) or a compile that runs past the limit. The harness
rewrites its JSON after every group, so after a crash the groups it finished
are kept, the group it was in is recorded as crashed, and a fresh process
carries on with the rest while time remains.

Writes OUT_DIR/cuda.json ({"machines": [...], "results": [...]}, the rows of
gen.bench plus error rows), OUT_DIR/cuda-N.json (attempt N's own file) and
appends everything printed to OUT_DIR/cuda.log.
"""

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = ["vae:128", "dcgan:64", "vae:4096", "conv-vae:128", "gan-2d:256", "wgan-gp:256", "dcgan:512",
        "conv-vae:1024"]
USAGE_ERROR = 2  # bench/run.py's exit status for a run refused before it timed anything
MODES = ["module", "eager", "undonated", "compiled", "compiled-ro", "compiled-bf16"]  # cheap ones first: they always get rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--total", type=float, default=330, help="seconds for everything (default 330)")
    parser.add_argument("--margin", type=float, default=35,
                        help="the harness starts nothing new this many seconds before --total (default 35)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan", nargs="*", default=PLAN,
                        help="MODEL:B1,B2 groups in order, as gen bench takes them (MODEL: its default batch sizes)")
    parser.add_argument("--mode", action="append", help="modes (default: " + " ".join(MODES) + ")")
    parser.add_argument("--harness", type=Path, default=ROOT / "bench" / "run.py",
                        help="the script to run (tests swap in one that crashes)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from gen.bench import plan  # noqa: E402  (the MODEL:B1,B2 entries gen bench takes)
    try:
        if not args.plan:  # plan() would read no entries as every model
            raise ValueError("no entries: give MODEL or MODEL:B1,B2 entries, or leave --plan out")
        remaining = plan(args.plan, None)  # MODEL alone: its default batch sizes
    except ValueError as error:
        sys.exit(f"error: --plan: {error}")
    for name in ("total", "margin"):  # before bench/run.py, which would name its own --time-budget
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            sys.exit(f"error: --{name} {getattr(args, name)} is not a non-negative number of seconds")
    # Absolute: the harness runs from the repository root, where a relative OUT would be another folder.
    args.out = args.out.resolve()
    log_path = args.out / "cuda.log"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with log_path.open("a"):
            pass
    except OSError as error:
        sys.exit(f"error: cannot write into {args.out} ({error.strerror}): give another OUT_DIR")
    start = time.monotonic()

    def say(line: str) -> None:
        line = f"[cuda.py t={time.monotonic() - start:5.0f}s] {line}"
        print(line, flush=True)
        with log_path.open("a") as log:
            log.write(line + "\n")

    modes = args.mode or MODES
    machines, results = [], []
    attempt = 0
    while remaining:
        left = args.total - (time.monotonic() - start)
        if left < 30:
            say(f"{len(remaining)} group(s) not started: {left:.0f} s left")
            results += [missing_row(m, b, mode, args.device, "skipped: time budget spent")
                        for m, b in remaining for mode in modes]
            break
        attempt += 1
        json_path = args.out / f"cuda-{attempt}.json"
        command = [sys.executable, str(args.harness), *[f"{m}:{b}" for m, b in remaining],
                   "--device", args.device, *[x for mode in modes for x in ("--mode", mode)],
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--no-compile-times",
                   "--time-budget", str(max(left - args.margin, 5)), "--json", str(json_path)]
        say(f"attempt {attempt}: {len(remaining)} group(s), {left:.0f} s left: {' '.join(command[2:])}")
        logged_before = log_path.stat().st_size
        rc = run_until(command, log_path, timeout=left)
        rows, machine = read_results(json_path)
        if rc == USAGE_ERROR and not rows:  # refused before timing anything: a fresh process would be too
            line = refusal(log_path, logged_before)
            say(f"attempt {attempt}: refused before timing anything; stopping")
            sys.exit(line)
        if machine:
            machines.append({"attempt": attempt, **machine})
        results += rows
        done = {(r["model"], r["batch_size"]) for r in rows}
        after = [g for g in remaining if g not in done]
        if rc == 0:
            say(f"attempt {attempt}: finished")
            remaining = after  # normally empty: skipped groups are rows too
            if remaining:  # should not happen; do not loop on it
                results += [missing_row(m, b, mode, args.device, "missing from the harness's output")
                            for m, b in remaining for mode in modes]
            break
        if not after:
            say(f"attempt {attempt}: exit status {rc} after its last group")
            break
        (model, batch), remaining = after[0], after[1:]
        # bench/run.py exits 143 (128 + SIGTERM) after writing what it has when `timeout` stops it
        reason = "killed at the time limit" if rc in (-signal.SIGTERM, -signal.SIGKILL, 124, 137, 143) \
            else f"crashed (exit status {rc})"
        say(f"attempt {attempt}: {reason} during {model} b{batch}; see cuda.log")
        results += [missing_row(model, batch, mode, args.device, f"{reason}; see cuda.log") for mode in modes]
    merged = args.out / "cuda.json"
    merged.write_text(json.dumps({"machines": machines, "results": results}, indent=2) + "\n")
    say(f"wrote {merged}: {len(results)} rows, {sum(r.get('error') is None for r in results)} timed, "
        f"in {time.monotonic() - start:.0f} s")
    try:
        sys.path.insert(0, str(ROOT))
        from gen.bench import print_table
        print_table(results, machines[0] if machines else None)
    except Exception as error:  # the JSON is what matters
        say(f"(table failed: {type(error).__name__}: {error})")


def run_until(command: list[str], log_path: Path, timeout: float) -> int:
    """Run the harness, output appended to the log; past `timeout` SIGTERM it (the harness then
    writes what it has), and SIGKILL it 5 s later if it is still there."""
    with log_path.open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                return process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                return process.wait()


def refusal(log_path: Path, start: int) -> str:
    """The harness's one-line `error:` in what it appended to the log after `start`."""
    with log_path.open("rb") as log:
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else f"error: the harness exited with status {USAGE_ERROR} before timing anything: " \
        f"see {log_path}"


def read_results(path: Path) -> tuple[list[dict], dict | None]:
    try:
        data = json.loads(path.read_text())
        return data["results"], data["machine"]
    except (OSError, ValueError, KeyError):
        return [], None


def missing_row(model: str, batch: int, mode: str, device: str, error: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from gen.bench import ROW_FIELDS  # noqa: E402  (gen is light to import; torch comes with it)
    return {**dict.fromkeys(ROW_FIELDS), "model": model, "batch_size": batch, "mode": mode, "device": device,
            "error": error}


if __name__ == "__main__":
    main()

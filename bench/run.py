"""`gen bench` from a checkout, without the installed command:

    python bench/run.py [MODEL ...] [--batch-size B ...] [--steps N] [--repeats R]
                        [--mode compiled|undonated|eager|module|vmap-N|compiled-bf16|compiled-ro ...]
                        [--device auto|cpu|cuda] [--json FILE] [--no-compile-times]
                        [--time-budget SECONDS]

`compiled-ro` (CUDA graphs) runs on CUDA only; `compiled-bf16` (bf16 autocast,
another precision) on either device. A mode that fails is a row with an `error` field; --time-budget starts
nothing new once the seconds are spent; SIGTERM (e.g. from `timeout`) ends the
run like Ctrl-C: the table and the JSON of the finished groups are written.

Both call gen.bench.main; see bench/README.md for what the columns mean.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from gen import mkl_amd  # noqa: E402

mkl_amd.load()  # before torch is imported, as `gen bench` does (gen/mkl_amd.py)

from gen import bench  # noqa: E402


USAGE_ERROR = 2  # the exit status of a run refused before it timed anything (bench/cuda.py stops on it)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as `gen bench` gives, not the usage block
        self.exit(USAGE_ERROR, f"error: {message} (see 'python bench/run.py --help')\n")


def main() -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*",
                        help=f"{' '.join(bench.MODELS)} (default all); MODEL:B1,B2 gives that model its own batch sizes")
    parser.add_argument("--batch-size", type=int, action="append", help="batch sizes (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the modes (median reported)")
    parser.add_argument("--mode", action="append",
                        help="compiled | undonated | eager | module | vmap-N | compiled-ro | compiled-bf16 "
                             "(repeatable)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    parser.add_argument("--no-compile-times", action="store_true",
                        help="skip the cold/warm compile measurements in fresh processes")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new model, mode or round after them; write what was done")
    args = parser.parse_args()
    signals = []  # the signals that ended the run early, for the exit status

    def interrupt(signum, frame) -> None:
        signals.append(signum)
        raise KeyboardInterrupt  # bench.main catches it, prints and writes what it has

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        bench.main(models=args.models or None, batch_sizes=args.batch_size, steps=args.steps, repeats=args.repeats,
                   device=args.device, json_path=args.json, modes=args.mode,
                   measure_compile=not args.no_compile_times, time_budget=args.time_budget)
    except (ValueError, OSError) as error:  # refused before the run: bad arguments, no CUDA device, ...
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:  # bench.main has printed and written what was done; the exit status says why
        signals[:] = signals or [signal.SIGINT]
    # Results are printed and written. Leave now: Inductor's atexit hook waits (up to 300 s)
    # for its compile-worker pool to shut down, which on the 16-core CUDA machine stalled
    # the exit by 15-30 s; the workers end themselves when this process is gone. A run cut
    # short by a signal exits as the shell reports one (128 + its number: 143 for SIGTERM),
    # so bench/cuda.py can tell it from a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signals[0] if signals else 0)


if __name__ == "__main__":
    main()

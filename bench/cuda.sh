#!/usr/bin/env bash
# The CUDA benchmark in one command, for a machine nobody can debug:
#
#     OUT=/some/dir bash bench/cuda.sh     # from anywhere; OUT defaults to bench/cuda-out
#
# Modes module, eager, undonated, compiled, compiled-ro (CUDA graphs) and compiled-bf16 for
# every model at GPU batch sizes (vae 128/4096, dcgan 64/512, conv-vae 128/1024,
# gan-2d 256, wgan-gp 256), in priority order, no fresh-process compile probes
# (first_call_s still shows each compile). Everything ends within TOTAL seconds
# (default 330) plus a few for start-up: bench/cuda.py runs the harness with a
# time budget, records failing modes as error rows, and restarts it on the
# remaining groups if the process itself dies. Results: $OUT/cuda.json; log:
# $OUT/cuda.log; machine: $OUT/env.txt.
set -u
export COLUMNS=${COLUMNS:-160}   # rich tables in the log at full width
export GEN_BENCH_TRACEBACKS=1    # a failing mode's traceback goes to the log too
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/cuda-out}
TOTAL=${TOTAL:-330}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}   # the GPU image has only python3
DEVICE=${DEVICE:-cuda}           # DEVICE=cpu: a smoke test of this script (the CUDA modes are skipped)
mkdir -p "$OUT"
: > "$OUT/cuda.log"
{ date -u; uptime; timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$OUT/cuda.log"
status=0
"$PYTHON" bench/cuda.py "$OUT" --total "$TOTAL" --device "$DEVICE" "$@" || status=$?
echo "results in $OUT/cuda.json, log in $OUT/cuda.log"
exit "$status"  # cuda.py's own status: a refused run (no CUDA device) is not a success

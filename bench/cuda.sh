#!/usr/bin/env bash
# The CUDA benchmark in one command, for a machine that cannot be debugged:
#
#     OUT=/some/dir bash bench/cuda.sh        # from the repository root; OUT defaults to bench/cuda-out
#
# Every model runs in its own process (a crash or a sticky CUDA error costs one model,
# not the run) with modes module, eager, compiled, compiled-ro (CUDA graphs) and
# compiled-bf16, at GPU-sized batches, no fresh-process compile probes (first_call_s
# still shows this process's compile). Each model gets a slice of TOTAL seconds
# (default 210): the harness starts nothing new once its slice is spent (--time-budget)
# and `timeout` kills it if a compile runs far over; unused time passes to the next
# model, and nothing runs past TOTAL. Each process rewrites its JSON after every
# batch size, so a killed one still leaves what it finished.
#
# Writes $OUT/cuda.json (all rows merged, {"machines": [...], "results": [...]}),
# $OUT/cuda-MODEL.json, $OUT/cuda.log (everything printed) and $OUT/env.txt.
set -u
export COLUMNS=${COLUMNS:-160}   # rich tables in the log at full width
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/cuda-out}
TOTAL=${TOTAL:-210}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a smoke test of this script (the CUDA modes are skipped)
mkdir -p "$OUT"
LOG="$OUT/cuda.log"
: > "$LOG"
start=$(date +%s)
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -5
    "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
    uptime
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

MODES="--mode module --mode eager --mode compiled --mode compiled-ro --mode compiled-bf16"
used=0
# model  slice_s  steps  batch sizes...
run_model() {
    local model=$1 slice=$2 steps=$3; shift 3
    local batches=() b
    for b in "$@"; do batches+=(--batch-size "$b"); done
    used=$((used + slice))
    local now=$(( $(date +%s) - start ))
    local budget=$((used - now))                 # this slice plus what earlier models left unused
    local hard=$((budget + 20))                  # grace for a compile already under way ...
    (( now + hard > TOTAL )) && hard=$((TOTAL - now))   # ... but never past TOTAL
    if (( budget < 10 || hard < 15 )); then
        echo "=== $model: skipped, $((TOTAL - now)) s left of $TOTAL" | tee -a "$LOG"
        return
    fi
    echo "=== $model b$* : budget ${budget}s, hard limit ${hard}s (t=${now}s)" | tee -a "$LOG"
    timeout -k 5 "$hard" "$PYTHON" bench/run.py "$model" --device "$DEVICE" $MODES "${batches[@]}" \
        --steps "$steps" --repeats 5 --no-compile-times --time-budget "$budget" \
        --json "$OUT/cuda-$model.json" >> "$LOG" 2>&1
    local rc=$?
    (( rc != 0 )) && echo "=== $model: exit status $rc" | tee -a "$LOG"
}

run_model vae      40 50 128 4096
run_model dcgan    50 20 64 512
run_model conv-vae 45 20 128 1024
run_model gan-2d   30 50 256
run_model wgan-gp  50 20 256

"$PYTHON" - "$OUT" >> "$LOG" 2>&1 <<'PY'
# Merge the per-model files into cuda.json and print one table over all of them.
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
out = Path(sys.argv[1])
machines, results = [], []
for model in ("vae", "dcgan", "conv-vae", "gan-2d", "wgan-gp"):
    path = out / f"cuda-{model}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"{model}: no results ({type(error).__name__})")
        continue
    machines.append({"model": model, **data["machine"]})
    results += data["results"]
(out / "cuda.json").write_text(json.dumps({"machines": machines, "results": results}, indent=2) + "\n")
print(f"wrote {out / 'cuda.json'}: {len(results)} rows, {sum(r.get('error') is None for r in results)} timed")
try:
    from gen.bench import print_table
    print_table(results, machines[0] if machines else None)
except Exception as error:
    print(f"(table failed: {error})")
PY
echo "=== done in $(( $(date +%s) - start )) s; results in $OUT/cuda.json, log in $LOG" | tee -a "$LOG"
tail -n 60 "$LOG"

"""`gen bench`, training throughput: gen's pure step compiled and eager, against an nn.Module peer.

For every model and batch size, each mode's full training step is built,
warmed up, and then timed in rounds: one repeat of every mode per round, the
order rotating between rounds, so the drift of a shared machine hits all
modes alike and their ratios stay meaningful (nanoGPT's bench.py: burn-in,
then time, synchronising the device).

    compiled   gen's pure step compiled as `gen train` runs it (gen/compilation.py): one graph,
               static shapes, the state's buffers donated, Dynamo's guards skipped once warm
    undonated  the plain torch.compile(step, fullgraph=True, dynamic=False): new state tensors
               every step, guards checked on every call
    eager      the same pure step, uncompiled
    module     bench/peers.py: nn.Module + torch.optim written as pytorch/examples writes it
    vmap-N     N independent models in one step: torch.compile(vmap(step)) over stacked states
    compiled-bf16  `compiled` with the step under torch.autocast(device, dtype=torch.bfloat16):
                   matmuls and convolutions in bf16, so another precision than the other modes
    compiled-ro    CUDA only: mode="reduce-overhead" (CUDA graphs), the state kept in fixed buffers

A mode or model that raises is recorded as a row with an `error` field and
the run goes on; `time_budget` stops a run cleanly, keeping what it has.
Every gen mode starts from the same state and batch, so each compiled mode's
metrics on its first two steps are checked against eager's (`first_step_vs_eager`,
`second_step_vs_eager`).

Data and noise are synthetic, drawn once onto the device as tensors (a small
pool cycled through), so the numbers measure the step and nothing else; the
peers draw their noise inside the step, as their scripts do. samples/s counts
the real examples a step consumes (batch × batches per step × models).

Compile time is measured in fresh Python processes (`python -m gen.bench
--compile-probe ...`): *cold* with an empty TORCHINDUCTOR_CACHE_DIR, *warm*
with the directory the cold process filled — what the first and the second
run of `gen train` pay before the first step (torch/gen imports excluded,
the first call's step included). The timed `compiled` mode itself uses the
normal on-disk cache (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>),
so a second `gen bench` compiles warm; its own first-call time is `first_call_s`.

The package, one file per part:

    machine.py       the device, the float32 matmul peak, memory, timing
    modes.py         one runner per mode (compiled, undonated, eager, module, vmap-N, CUDA modes)
    compile_time.py  cold and warm compile seconds, in fresh processes
    harness.py       groups, interleaved rounds, error rows; main (time, then print and write)
    report.py        the table, × module, the checks on the --json file
"""

from gen.bench.compile_time import compile_probe, compile_seconds
from gen.bench.harness import ROW_FIELDS, available_models, available_modes, main, plan, run, time_group
from gen.bench.machine import keep_freed_memory, machine, matmul_peak_gflops, time_mode
from gen.bench.modes import CUDA_MODES, MODELS, MODES, PEERS_DIR, \
    cudagraph_runner, donated_runner, flops_per_step, load_peers, make_runner, model_config, \
    synthetic_inputs
from gen.bench.report import print_table, speedups
from gen.checkpoint import json_safe
from gen.device import autocast_step, resolve_device

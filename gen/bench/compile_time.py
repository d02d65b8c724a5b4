"""Compile time in fresh processes: cold with an empty TORCHINDUCTOR_CACHE_DIR, warm with
the directory the cold process filled (`python -m gen.bench --compile-probe MODEL BATCH DEVICE`)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gen.device import resolve_device, synchronize
from gen.bench.modes import model_config, synthetic_inputs
from gen.compilation import compile_for_training
from gen.tree import to_device


def compile_probe(model: str, batch_size: int, device: str) -> float:
    """Seconds from building the compiled step to the end of its first call (compile + one step)."""
    family, config, shape = model_config(model, batch_size)
    device = resolve_device(device)
    state = to_device(family.init(config, shape, 0), device)
    (batch, inputs), = synthetic_inputs(family, config, shape, device)[:1]
    start = time.perf_counter()
    step, state, layout = compile_for_training(family.make_step(config, shape), state, device,
                                               donate=True)  # as gen train compiles it
    step(state, layout(batch), inputs)
    synchronize(device)
    return time.perf_counter() - start


def compile_seconds(model: str, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(cold, warm): compile_probe in a fresh process with an empty inductor cache, then in
    another fresh process reusing the cache the first one wrote."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="gen-bench-cache-") as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        for attempt in ("cold", "warm"):
            command = [sys.executable, "-m", "gen.bench", "--compile-probe", model, str(batch_size), device.type]
            out = subprocess.run(command, env=env, capture_output=True, text=True,
                                 cwd=str(Path(__file__).resolve().parents[2]))
            if out.returncode != 0:  # say why: the probe's last line of stderr is its exception
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"the {attempt} compile probe exited with status {out.returncode}: {last}")
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            if attempt == "warm" and not probe["cache"].get("inductor.fxgraph_cache_hit"):
                print(f"note: {model} b{batch_size}: the warm compile missed the FX graph cache ({probe['cache']})")
            seconds.append(probe["seconds"])
    return seconds[0], seconds[1]

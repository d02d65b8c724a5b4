"""python -m gen.bench --compile-probe MODEL BATCH DEVICE: the compile-time probe that
gen.bench.compile_time.compile_seconds runs in a fresh process (use `gen bench` to benchmark)."""

import json
import sys

from gen.bench.compile_time import compile_probe

if len(sys.argv) == 5 and sys.argv[1] == "--compile-probe":
    seconds = compile_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    from torch._dynamo.utils import counters
    hits = {f"{group}.{name}": n for group in ("inductor", "aot_autograd") for name, n in counters[group].items()
            if "cache" in name}
    print(json.dumps({"seconds": seconds, "cache": hits}))
else:
    sys.exit("usage: python -m gen.bench --compile-probe MODEL BATCH DEVICE (use `gen bench` to benchmark)")

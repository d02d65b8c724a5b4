"""The benchmark harness without torch.compile: FLOP counting, the nn.Module peers'
parity with gen's losses (the proof they are the same models), and one end-to-end run."""

import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from gen import bench, compilation, models, optim
from gen.bench import compile_time, harness, report
from gen.tree import leaves, take

peers = bench.load_peers()
machine_module = importlib.import_module("gen.bench.machine")  # gen.bench.machine is the function machine()
modes_module = importlib.import_module("gen.bench.modes")
SHAPE = (1, 28, 28)


def test_vae_flops_match_the_analytic_count():
    # FlopCounterMode counts 2 FLOPs per multiply-add of each matmul (addmm, mm).
    # Forward: 784→400, 400→20 twice (mean, log-variance), 20→400, 400→784.
    # Backward: every layer's weight gradient (same FLOPs as its forward) and every
    # layer's input gradient except the first (the data needs none).
    batch = 32
    _, config, shape = bench.model_config("vae", batch)
    forward = 2 * batch * (784 * 400 + 400 * 40 + 20 * 400 + 400 * 784)
    expected = 3 * forward - 2 * batch * 784 * 400
    assert bench.flops_per_step("vae", config, shape, batch) == expected


def gen_losses(model, batch_size, overrides=None, seed=0):
    """gen's state, one batch, its noise and the metrics of one eager step on them."""
    family, config, shape = bench.model_config(model, batch_size)
    config = replace(config, **(overrides or {}))
    state = family.init(config, shape, seed)
    (batch, noise), = bench.synthetic_inputs(family, config, shape, torch.device("cpu"), seed)[:1]
    _, metrics = family.make_step(config, shape)(state, batch, noise)
    return family, config, shape, state, batch, noise, metrics


@pytest.mark.parametrize("model, names", [("vae", "VAE_NAMES"), ("conv-vae", "CONV_VAE_NAMES")])
def test_vae_peers_compute_gen_loss(model, names):
    _, config, shape, state, batch, noise, metrics = gen_losses(model, 8)
    peer = peers.build(model, config, shape, "cpu")
    peers.load_gen_weights(peer.model, state["params"], getattr(peers, names))
    # pytorch/examples sums over the batch; gen minimises the batch mean.
    loss_sum = peer.step(batch, eps=noise["eps"])
    torch.testing.assert_close(loss_sum / len(batch), metrics["loss"], rtol=1e-5, atol=1e-4)


def load_gan(peer, state, depth=None):
    g_names = peers.DCGAN_GENERATOR_NAMES if depth is None else peers.mlp_names(depth)
    d_names = peers.DCGAN_DISCRIMINATOR_NAMES if depth is None else peers.mlp_names(depth)
    for net, names, side in ((peer.netG, g_names, "generator"), (peer.netD, d_names, "discriminator")):
        tensors = {**take(state["params"], side), **take(state.get("model_state", {}), side)}
        peers.load_gen_weights(net, tensors, names)


@pytest.mark.parametrize("model", ["dcgan", "gan-2d"])
def test_gan_peers_compute_gen_losses(model):
    _, config, shape, _, _, _, _ = gen_losses(model, 16)
    family = models.get(bench.MODELS[model][0])
    state = family.init(config, shape, 0)
    (batch, noise), = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))[:1]
    # The peer reuses one G(z) for the D and the G update, as pytorch/examples does, and so does
    # gen's step for these models (gan.reuses_fake): no z_generator is drawn.
    assert "z_generator" not in noise
    _, metrics = family.make_step(config, shape)(state, batch, noise)
    peer = peers.build(model, config, shape, "cpu")
    load_gan(peer, state, None if model == "dcgan" else peers.mlp_depth())
    d_loss, g_loss = peer.step(batch, noise["z_discriminator"][0])
    torch.testing.assert_close(d_loss, metrics["d_loss"], rtol=1e-5, atol=1e-5)
    # G's loss follows one Adam step of D on each side: equal up to that step's float noise.
    torch.testing.assert_close(g_loss, metrics["g_loss"], rtol=1e-3, atol=1e-3)


def test_wgan_gp_peer_computes_gen_losses():
    family = models.get("wgan-gp")
    _, config, shape = bench.model_config("wgan-gp", 16)
    config = replace(config, n_critic=1)  # one critic update: its loss is compared before any step
    state = family.init(config, shape, 0)
    (batch, noise), = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))[:1]
    _, metrics = family.make_step(config, shape)(state, batch, noise)
    peer = peers.build("wgan-gp", config, shape, "cpu")
    load_gan(peer, state, peers.mlp_depth())
    d_loss, g_loss = peer.step(batch, noise)
    expected = metrics["d_loss"] + config.gp_weight * metrics["gradient_penalty"]
    torch.testing.assert_close(d_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_loss, metrics["g_loss"], rtol=1e-3, atol=1e-3)


def test_harness_runs_end_to_end_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    results = bench.main(models=["vae"], batch_sizes=[16], steps=2, repeats=2, device="cpu",
                         json_path=str(path), modes=["eager", "module"])
    assert [(r["model"], r["batch_size"], r["mode"]) for r in results] == [("vae", 16, "eager"), ("vae", 16, "module")]
    for r in results:
        assert tuple(r) == bench.ROW_FIELDS  # the JSON's fields, as error rows have them too
        assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        assert r["ms_per_step"] > 0 and r["gflops"] > 0 and 0 < r["pct_of_peak"] and r["peak_memory_mb"] > 0
        assert r["cold_compile_s"] is None  # nothing compiled in these modes
        assert len(r["round_seconds"]) == 2 and r["ms_per_step"] == pytest.approx(
            1000 * statistics.median(r["round_seconds"]) / 2)
    eager, module = results
    assert module["paired_vs_module"] == 1.0 and module["vs_module"] == 1.0
    assert eager["vs_module"] == pytest.approx(eager["samples_per_s"] / module["samples_per_s"])
    assert eager["paired_vs_module"] == pytest.approx(statistics.median(
        [m / e for m, e in zip(module["round_seconds"], eager["round_seconds"])]))
    written = json.loads(path.read_text())
    assert written["results"] == results and written["machine"]["torch"] == torch.__version__
    by_library = written["machine"]["matmul_gflops_at_start"]  # the peak is the faster library's
    assert "torch.mm" in by_library and results[0]["peak_gflops"] <= max(by_library.values()) * 1.5


def test_the_cpu_matmul_peak_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """torch.mm (MKL in the x86 wheels) is not torch's fastest float32 GEMM on every CPU: the
    peak times oneDNN's too, takes the faster, and does without a library this torch cannot run."""
    machine = importlib.import_module("gen.bench.machine")  # gen.bench.machine is also a function's name
    libraries = machine.matmul_samplers("cpu", size=64)
    expected = ["torch.mm", "oneDNN"] if torch.backends.mkldnn.is_available() else ["torch.mm"]
    assert list(libraries) == expected and all(sample() > 0 for sample in libraries.values())

    def broken(*args):
        raise RuntimeError("no oneDNN here")
    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
        assert list(machine.matmul_samplers("cpu", size=64)) == ["torch.mm"]
    monkeypatch.setattr(machine, "matmul_samplers", lambda device, size=None: {"torch.mm": lambda: 120.0,
                                                                               "oneDNN": lambda: 210.0})
    assert machine.matmul_sampler("cpu")() == 210.0
    assert machine.matmul_peak_gflops("cpu") == 210.0


def test_paired_ratio_pairs_rounds_and_stops_where_a_mode_stopped():
    # the peer took 2, 4, 6 s in rounds 1-3; the mode 1 s in rounds 1-2, then failed
    assert harness.paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0]) == 3.0
    assert harness.paired_ratio([], [1.0]) is None  # no peer in the run


def test_unknown_mode_and_model_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        bench.available_modes(["fast"])
    with pytest.raises(ValueError, match="unknown bench model"):
        bench.available_models(["gpt"])


def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch):
    """Checked first: a bad --json must not cost the user a whole benchmark run's results."""
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="directory .*missing does not exist: create it"):
        harness.main(models=["gan-2d"], json_path=str(tmp_path / "missing" / "bench.json"))
    with pytest.raises(ValueError, match="^--json: cannot write .*: it is a directory; give the path of a file"):
        harness.main(models=["gan-2d"], json_path=str(tmp_path))
    real_temporary_file = report.tempfile.TemporaryFile

    def refusing(*args, dir=None, **kwargs):  # a directory that exists but takes no new file (read-only, /proc)
        if str(dir) == str(tmp_path / "readonly"):
            raise PermissionError(13, "Permission denied")
        return real_temporary_file(*args, dir=dir, **kwargs)
    (tmp_path / "readonly").mkdir()
    monkeypatch.setattr(report.tempfile, "TemporaryFile", refusing)
    with pytest.raises(ValueError, match="bench.json cannot be written \\(Permission denied\\): choose another"):
        harness.main(models=["gan-2d"], json_path=str(tmp_path / "readonly" / "bench.json"))
    assert list((tmp_path / "readonly").iterdir()) == []


def test_a_json_path_holding_a_gen_checkpoint_is_refused_before_the_run(tmp_path, monkeypatch):
    from gen import checkpoint
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, {"w": torch.ones(2)}, {"model": "vae"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="ck.safetensors is a gen checkpoint, .*give another file name"):
        harness.main(models=["gan-2d"], json_path=str(path))
    assert path.read_bytes() == before


def test_a_json_path_that_is_a_stream_or_a_runs_own_file_is_refused(tmp_path, monkeypatch):
    """`--json /dev/stdout >> log.txt` resolves to log.txt, which the results would have replaced
    whole; a run folder's metrics.jsonl or config.json would have lost the run's log or settings."""
    from gen import checkpoint
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    for stream in ("/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/1", f"/proc/{os.getpid()}/fd/2"):
        with pytest.raises(ValueError, match=f"--json {stream} is one of the process's streams, not a file"):
            harness.main(models=["gan-2d"], json_path=stream)
    checkpoint.save(tmp_path / checkpoint.FILE_NAME, {"w": torch.ones(2)}, {"model": "vae"})
    for name in ("metrics.jsonl", "config.json", "summary.json"):
        (tmp_path / name).write_text("mine\n")
        with pytest.raises(ValueError, match=f"is a gen run's own {name}, which the results would replace"):
            harness.main(models=["gan-2d"], json_path=str(tmp_path / name))
        assert (tmp_path / name).read_text() == "mine\n"


def test_json_paths_that_are_not_plain_new_or_regular_files(tmp_path, monkeypatch):
    """A symbolic link is followed (its file replaced, the link kept); a pipe or device is refused,
    not replaced by a regular file; an empty name or a file where a directory should be is refused
    in one line; a long file name (near NAME_MAX) is written."""
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: [])  # no timing: what is written is the point
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("{}\n")
    link.symlink_to(real)
    harness.main(models=["gan-2d"], json_path=str(link))
    assert link.is_symlink() and json.loads(real.read_text())["results"] == []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="cannot write .*fifo: it is not a regular file .*give the path of a file"):
        harness.main(models=["gan-2d"], json_path=str(fifo))
    assert fifo.is_fifo()
    with pytest.raises(ValueError, match="--json needs a file name"):
        harness.main(models=["gan-2d"], json_path="")
    with pytest.raises(ValueError, match="real.json is not a directory"):
        harness.main(models=["gan-2d"], json_path=str(real / "x.json"))
    long = tmp_path / ("b" * 245 + ".json")  # 250 bytes: a valid name, too long for a suffixed copy
    harness.main(models=["gan-2d"], json_path=str(long))
    assert json.loads(long.read_text())["results"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.json", "link.json", "fifo", long.name])


def test_an_unusable_compile_cache_directory_is_one_line_before_the_run(tmp_path, monkeypatch):
    """Even eager runs touch Inductor's cache (importing Dynamo creates it): a bad one gave
    misleading error rows, then a traceback from torch._dynamo.reset()."""
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    a_file = tmp_path / "cache"
    a_file.write_text("")
    for directory, reason in ((a_file, "it is not a directory"), (a_file / "sub", "Not a directory")):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(directory))
        with pytest.raises(ValueError, match=f"^TORCHINDUCTOR_CACHE_DIR {directory} cannot be used \\({reason}\\): "
                                             "set it to a writable directory or unset it$"):
            harness.main(models=["vae"], modes=["eager"])
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "new" / "cache"))  # created if missing
    compilation.check_compile_cache()
    assert (tmp_path / "new" / "cache").is_dir()
    probed = []  # set but empty: Inductor takes the working directory (abspath("")), so the check does too
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path / "new")
    monkeypatch.setattr(compilation.tempfile, "TemporaryFile",
                        lambda dir: probed.append(dir) or open(os.devnull, "rb"))
    compilation.check_compile_cache()
    assert probed == [str(tmp_path / "new")]


def test_a_time_budget_that_is_not_a_positive_number_is_refused(monkeypatch):
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    for budget in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--time-budget .* is not a positive number of seconds"):
            harness.main(models=["vae"], time_budget=budget)


def test_a_json_write_that_fails_mid_run_loses_no_timing(tmp_path, monkeypatch, capsys):
    def disk_full(path, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(harness.checkpoint, "write_text", disk_full)
    results = bench.main(models=["gan-2d"], batch_sizes=[8], steps=1, repeats=1, device="cpu",
                         json_path=str(tmp_path / "bench.json"), modes=["eager"])
    assert [r["error"] for r in results] == [None]
    assert "could not write" in capsys.readouterr().out


def test_non_finite_values_are_written_as_json_null():
    """A NaN metric makes a step check inf; Python would write `Infinity`, which strict JSON refuses."""
    value = {"a": [float("inf"), 1.5], "b": {"c": float("nan")}, "d": "x", "e": None, "f": 2}
    assert bench.json_safe(value) == {"a": [None, 1.5], "b": {"c": None}, "d": "x", "e": None, "f": 2}
    json.loads(json.dumps(bench.json_safe(value), allow_nan=False))


def test_modes_and_groups_named_twice_are_timed_once():
    assert bench.available_modes(["eager", "module", "eager"], "cpu") == ["eager", "module"]
    assert bench.plan(["vae:16", "gan-2d:8", "vae:16,32"], None) == [("vae", 16), ("gan-2d", 8), ("vae", 32)]


def test_a_batch_size_the_model_cannot_use_is_refused_before_timing(monkeypatch):
    """The library's own check (a GAN's batch norm on images needs two examples), up front: it was
    error rows for the gen modes, and the module peer's own torch error, with exit status 0."""
    monkeypatch.setattr(harness, "time_group", lambda *args, **kwargs: pytest.fail("a group was timed"))
    monkeypatch.setattr(harness, "matmul_samplers", lambda *args, **kwargs: pytest.fail("the peak was timed"))
    message = "^dcgan b1: --batch-size 1 is too small for dcgan's batch norm on images: use --batch-size 2 or more$"
    with pytest.raises(ValueError, match=message):
        bench.run(["vae", "dcgan:1"], None, 1, 1, "cpu", ["eager", "module"], measure_compile=False)
    with pytest.raises(ValueError, match=message):
        bench.plan(["gan-2d", "dcgan"], [1])  # gan-2d's MLPs take one example
    assert bench.plan(["gan-2d:1", "dcgan:2"], None) == [("gan-2d", 1), ("dcgan", 2)]
    # past gen train's limit (and past int64, where torch raises a TypeError): refused, not an error row
    for entries, sizes in ((["vae:99999999999999999999999"], None), (["vae"], [2**63 - 1]), (["vae"], [2**31])):
        with pytest.raises(ValueError, match="^batch size [0-9]+ is too large: the most is 2,147,483,647"):
            bench.plan(entries, sizes)


def test_a_group_too_big_for_memory_is_refused_before_timing(monkeypatch):
    """Past the machine's memory the kernel kills the process, with no message and no JSON: a group
    whose input pool and state alone would not fit is refused first, vmap-N's N copies counted."""
    monkeypatch.setattr(harness, "time_group", lambda *args, **kwargs: pytest.fail("a group was timed"))
    monkeypatch.setattr(harness, "matmul_samplers", lambda *args, **kwargs: pytest.fail("the peak was timed"))
    monkeypatch.setattr(harness, "memory_bytes", lambda device: 1e9)
    with pytest.raises(ValueError, match=r"^vae b100000 needs more than 1.3 GB, and this CPU has 1.0 GB: use a "
                                         r"smaller batch size$"):
        bench.run(["vae:100000"], None, 1, 1, "cpu", ["eager"], measure_compile=False)
    # the VAE's state (params, Adam's two moments and its count) is about 2M floats: 16 MB with its update
    with pytest.raises(ValueError, match=r"^vae b2, 100 models at once needs more than 1\.[0-9] GB, .* or fewer "
                                         r"models \(vmap-N\)$"):
        bench.run(["vae:2"], None, 1, 1, "cpu", ["eager", "vmap-100"], measure_compile=False)


def test_a_run_with_no_mode_left_is_refused(capsys):
    with pytest.raises(ValueError, match="no mode left to run on this device"):
        bench.available_modes(["compiled-ro"], "cpu")


def test_cuda_peak_memory_is_each_modes_own(monkeypatch):
    """On CUDA each row's peak MB is what the mode allocated beyond what was already held (the
    peak's matrices, the modes built before it). The CUDA calls are stood in for, on the CPU."""
    allocated = {"now": 800 * 2 ** 20, "peak": 0}  # 800 MB held before the first mode

    def build(mode, *args, **kwargs):
        allocated["now"] += {"eager": 100, "module": 30}[mode] * 2 ** 20  # each mode keeps its state
        allocated["peak"] = allocated["now"] + 50 * 2 ** 20  # and briefly needs 50 MB more
        return lambda n: None
    fake_cuda = {"memory_allocated": lambda device=None: allocated["now"],
                 "max_memory_allocated": lambda device=None: allocated["peak"],
                 "reset_peak_memory_stats": lambda device=None: allocated.update(peak=allocated["now"]),
                 "synchronize": lambda device=None: None, "empty_cache": lambda: None}
    for name, function in fake_cuda.items():
        monkeypatch.setattr(torch.cuda, name, function)
    monkeypatch.setattr(harness, "make_runner", build)
    monkeypatch.setattr(harness, "time_mode", lambda runner, n, device: 0.01 * n)
    rows = harness.time_group("vae", 16, 1, 1, torch.device("cuda"), ["eager", "module"], 1, False, print,
                              lambda: False, lambda: 1.0, [])
    assert [round(r["peak_memory_mb"]) for r in rows] == [150, 80]


def test_a_failed_compile_probe_says_why(monkeypatch):
    import subprocess
    from gen.bench import compile_time
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nRuntimeError: no C compiler\n")
    monkeypatch.setattr(compile_time.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="the cold compile probe exited with status 1: RuntimeError: no C compiler"):
        compile_time.compile_seconds("vae", 16, torch.device("cpu"))


# --- robustness: what a run on a machine nobody can debug relies on --------------------


def test_cuda_modes_are_skipped_on_cpu(capsys):
    assert bench.available_modes(["compiled-ro", "eager", "compiled-bf16"], "cpu") == ["eager", "compiled-bf16"]
    assert "needs --device cuda" in capsys.readouterr().out
    assert bench.available_modes(["compiled-ro", "compiled-bf16"], "cuda") == ["compiled-ro", "compiled-bf16"]


def test_a_failing_mode_becomes_an_error_row_and_the_run_goes_on(monkeypatch, capsys):
    real = bench.make_runner

    def flaky(mode, model, *args, **kwargs):
        advance = real(mode, model, *args, **kwargs)
        if model != "vae":
            return advance
        if mode == "eager":
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        calls = []

        def fails_in_the_second_round(n):  # build + warm-up are calls 1 and 2, round 1 is call 3
            calls.append(n)
            if len(calls) == 4:
                raise ValueError("boom")
            advance(n)
        return fails_in_the_second_round if mode == "module" else advance

    monkeypatch.setattr(harness, "make_runner", flaky)  # where the harness looks it up
    results = bench.run(["vae", "gan-2d"], [16], 2, 3, "cpu", ["eager", "module"], measure_compile=False)
    by_key = {(r["model"], r["mode"]): r for r in results}
    assert by_key[("vae", "eager")]["error"] == "RuntimeError: CUDA error: out of memory"
    assert by_key[("vae", "module")]["error"] == "ValueError: boom"
    assert by_key[("vae", "eager")]["samples_per_s"] is None and by_key[("vae", "eager")]["pct_of_peak"] is None
    for mode in ("eager", "module"):  # the next model still ran
        assert by_key[("gan-2d", mode)]["error"] is None and by_key[("gan-2d", mode)]["repeats"] == 3
    logged = capsys.readouterr().out
    assert "vae b16 eager: error: RuntimeError: CUDA error: out of memory" in logged
    assert "Traceback" not in logged  # one line per failure unless GEN_BENCH_TRACEBACKS=1
    bench.print_table(results)  # error rows print too

    monkeypatch.setenv("GEN_BENCH_TRACEBACKS", "1")  # bench/cuda.sh: the whole traceback goes to the log
    bench.run(["vae"], [16], 1, 1, "cpu", ["eager"], measure_compile=False)
    logged = capsys.readouterr().out
    assert "Traceback (most recent call last)" in logged and "more detail" in logged and "in flaky" in logged


def doubled(x):
    return 2 * x


def test_a_run_compiles_the_same_function_more_times_than_dynamo_keeps_graphs(monkeypatch):
    """Each group compiles the same Python functions again for new shapes, and Dynamo keeps at most
    8 graphs per function: without a reset between groups the ninth compile of a run failed
    (FailOnRecompileLimitHit, seen on CUDA at the fifth group). Ten groups, one compile each."""
    shapes = iter(range(1, 11))

    def compiling(mode, model, config, shape, device):
        x = torch.ones(next(shapes))  # a new shape: a new graph of the same function
        step = torch.compile(doubled, fullgraph=True, dynamic=False, backend="eager")

        def advance(n):
            for _ in range(n):
                step(x)
        return advance

    monkeypatch.setattr(harness, "make_runner", compiling)
    results = bench.run(["vae", "gan-2d"], [16, 17, 18, 19, 20], 1, 1, "cpu", ["eager"], measure_compile=False)
    assert len(results) == 10 and [r["error"] for r in results] == [None] * 10


def test_time_budget_stops_cleanly_and_writes_what_it_has(tmp_path, monkeypatch):
    # A clock that moves only when a mode is built (40 s each), against a 70 s budget: eager and
    # module are built (0 -> 40 -> 80), undonated is not (the budget is spent), the built modes get
    # their one round and no second, and the next group is skipped whole.
    now = [0.0]
    built = []

    def make_runner(mode, model, config, shape, device):
        built.append((model, mode))
        now[0] += 40
        return lambda n: None

    monkeypatch.setattr(harness.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(harness, "make_runner", make_runner)
    monkeypatch.setattr(harness, "matmul_samplers", lambda device: {"torch.mm": lambda: 100.0})
    path = tmp_path / "bench.json"
    results = bench.main(models=["vae", "gan-2d"], batch_sizes=[16], steps=1, repeats=50, device="cpu",
                         json_path=str(path), modes=["eager", "module", "undonated"], time_budget=70)
    assert built == [("vae", "eager"), ("vae", "module")]
    by_key = {(r["model"], r["mode"]): r for r in results}
    assert [by_key[("vae", m)]["repeats"] for m in ("eager", "module")] == [1, 1]
    assert [by_key[("vae", m)]["error"] for m in ("eager", "module")] == [None, None]
    skipped = [("vae", "undonated")] + [("gan-2d", m) for m in ("eager", "module", "undonated")]
    assert all(by_key[key]["error"] == "skipped: time budget spent" for key in skipped)
    written = json.loads(path.read_text())
    assert written["results"] == results and written["machine"]["complete"] is True


def test_the_json_file_holds_each_finished_group_before_the_run_ends(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    real = bench.time_group

    def interrupted_second_group(model, *args, **kwargs):
        if model == "gan-2d":
            assert json.loads(path.read_text())["machine"]["complete"] is False  # vae already on disk
            raise KeyboardInterrupt  # what bench/run.py makes of SIGTERM from `timeout`
        return real(model, *args, **kwargs)

    monkeypatch.setattr(harness, "time_group", interrupted_second_group)
    with pytest.raises(KeyboardInterrupt):  # raised again once written, so the caller exits as interrupted
        bench.main(models=["vae", "gan-2d"], batch_sizes=[16], steps=1, repeats=1, device="cpu",
                   json_path=str(path), modes=["eager"])
    written = json.loads(path.read_text())
    assert [r["model"] for r in written["results"]] == ["vae"]
    assert written["machine"]["complete"] is False


def test_an_interrupt_before_any_group_finished_leaves_an_existing_json_file_as_it_was(tmp_path, monkeypatch,
                                                                                        capsys):
    path = tmp_path / "bench.json"
    path.write_text('{"machine": {"complete": true}, "results": [{"model": "vae"}]}\n')  # an earlier run's
    before = path.read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(harness, "time_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(models=["vae"], batch_sizes=[16], steps=1, repeats=1, device="cpu", json_path=str(path),
                   modes=["eager"])
    assert path.read_text() == before
    assert f"interrupted before any group finished: {path} left as it was" in capsys.readouterr().out


def test_autocast_and_cudagraph_runner_code_paths_on_cpu():
    # The bf16 and CUDA-graph modes' pieces, exercised eagerly on the CPU: the bf16 wrapper keeps the
    # state float32, and the fixed-buffer runner advances exactly as the pure step does.
    family, config, shape = bench.model_config("vae", 8)
    step = family.make_step(config, shape)
    pool = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))
    state = family.init(config, shape, 0)
    new_state, metrics = bench.autocast_step(step, torch.device("cpu"))(state, *pool[0])
    assert all(t.dtype == s.dtype for t, s in zip(leaves(new_state), leaves(state)))
    assert torch.isfinite(metrics["loss"])
    assert all(value.dtype == torch.float32 for value in metrics.values())  # logged as float32

    buffers_state = family.init(config, shape, 0)
    advance = bench.cudagraph_runner(step, buffers_state, pool)
    advance(3)
    expected, early_metrics = family.init(config, shape, 0), []
    for index in range(3):
        expected, expected_metrics = step(expected, *pool[index])
        early_metrics.append(expected_metrics)
    for got, want in zip(leaves(buffers_state), leaves(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the first two steps', not the last
    torch.testing.assert_close(advance.first_step_metrics, early_metrics[0], rtol=0, atol=0)
    torch.testing.assert_close(advance.second_step_metrics, early_metrics[1], rtol=0, atol=0)

    wgan_family, wgan_config, wgan_shape = bench.model_config("wgan-gp", 8)
    wgan_step = wgan_family.make_step(wgan_config, wgan_shape)
    # Its compile options come through the bf16 wrapper (without them its bf16 step failed to compile).
    assert bench.autocast_step(wgan_step, torch.device("cpu")).inductor_options == wgan_step.inductor_options


def test_every_gen_runner_keeps_its_first_two_steps_metrics():
    """The harness checks the compiled modes' first two steps against eager's (step_differences)."""
    family, config, shape = bench.model_config("gan-2d", 8)
    step = family.make_step(config, shape)
    pool = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))
    state, first = step(family.init(config, shape, 0), *pool[0])
    # Each advance(n) call starts again at the pool's first batch, in every mode alike.
    second_after = {(1, 2): step(state, *pool[0])[1], (3,): step(state, *pool[1])[1]}
    for calls, second in second_after.items():
        eager = bench.make_runner("eager", "gan-2d", config, shape, torch.device("cpu"))
        donated = bench.donated_runner(optim.donate(step), family.init(config, shape, 0), pool)  # uncompiled here
        for advance in (eager, donated):
            for n in calls:
                advance(n)
            torch.testing.assert_close(advance.first_step_metrics, first, rtol=0, atol=0)
            torch.testing.assert_close(advance.second_step_metrics, second, rtol=0, atol=0)


def test_step_differences_compare_each_mode_with_eager():
    def runner(**metrics):
        advance = lambda n: None  # noqa: E731
        advance.first_step_metrics = {name: torch.tensor(value) for name, value in metrics.items()}
        advance.second_step_metrics = {name: 2 * value for name, value in advance.first_step_metrics.items()}
        return advance

    runners = {"eager": runner(loss=500.0, logit=0.01), "same": runner(loss=500.0, logit=0.01),
               "relative": runner(loss=505.0, logit=0.01),      # 5 / 500
               "absolute": runner(loss=500.0, logit=0.03),      # 0.02 / max(1, 0.01)
               "nan": runner(loss=float("nan"), logit=0.01),
               "stacked": runner(loss=[500.0, 400.0], logit=[0.01, 0.02]),  # vmap-N: not comparable
               "module": lambda n: None}
    differences = harness.step_differences(runners)
    assert differences == pytest.approx({"same": 0.0, "relative": 0.01, "absolute": 0.02, "nan": float("inf")})
    assert harness.step_differences(runners, "second") == pytest.approx(  # the same metrics doubled
        {"same": 0.0, "relative": 0.01, "absolute": 0.04, "nan": float("inf")})
    assert harness.step_differences({k: v for k, v in runners.items() if k != "eager"}) == {}


def test_a_mode_whose_first_step_differs_from_eager_is_flagged(monkeypatch, capsys):
    real = bench.make_runner

    def off_by_one(mode, model, config, shape, device):
        advance = real("eager", model, config, shape, device)  # both modes run the eager step
        if mode == "eager":
            return advance

        def perturbed(n):
            first_call = not advance.first_step_metrics
            advance(n)
            if first_call:  # the first loss is a few hundred nats: 1e-3 to 1e-2 off
                advance.first_step_metrics["loss"] += 1.0
        perturbed.first_step_metrics = advance.first_step_metrics
        perturbed.second_step_metrics = advance.second_step_metrics
        return perturbed

    monkeypatch.setattr(harness, "make_runner", off_by_one)
    rows = bench.run(["vae"], [16], 1, 1, "cpu", ["eager", "undonated", "compiled-bf16"], measure_compile=False)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["eager"]["first_step_vs_eager"] is None
    assert 1e-3 < by_mode["undonated"]["first_step_vs_eager"] < 1e-2
    assert by_mode["undonated"]["second_step_vs_eager"] == 0.0  # only the first step's loss was nudged
    assert by_mode["compiled-bf16"]["first_step_vs_eager"] == by_mode["undonated"]["first_step_vs_eager"]
    logged = capsys.readouterr().out
    assert "vae b16 undonated: warning: its first step's metrics differ from eager's" in logged
    assert "compiled-bf16: warning" not in logged  # within bf16's tolerance


def test_run_py_refuses_bad_arguments_in_one_line_and_lists_every_mode():
    import subprocess
    import sys
    run = [sys.executable, str(bench.PEERS_DIR / "run.py")]
    for bad in (["--steps", "x"], ["--steps", "0"]):  # argparse's, then the harness's own check
        done = subprocess.run(run + bad, capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    help_text = subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    mode_help = help_text.split("--mode MODE", 2)[2].split("--device")[0]  # the option's own help
    assert all(mode in mode_help for mode in (*bench.MODES, "vmap-N", "compiled-bf16", "compiled-ro"))


CRASHING_HARNESS = '''
import os, runpy, sys
sys.path.insert(0, {root!r})
from gen.bench import harness
real = harness.time_group
def time_group(model, batch_size, *args, **kwargs):
    if model == "gan-2d":
        os._exit(3)  # as a segfault or a fatal CUDA error would end the process
    return real(model, batch_size, *args, **kwargs)
harness.time_group = time_group  # where the harness looks it up
sys.argv[0] = {run!r}
runpy.run_path({run!r}, run_name="__main__")
'''


TERMINATED_HARNESS = CRASHING_HARNESS.replace(
    "os._exit(3)  # as a segfault or a fatal CUDA error would end the process",
    "import signal; os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends")


def test_cuda_driver_reports_a_harness_stopped_at_the_time_limit(tmp_path):
    """SIGTERM (what `timeout` sends) makes bench/run.py write what it has and exit 143, which the
    driver reads as killed at the time limit during that group, not as a finished run."""
    import subprocess
    import sys
    root = bench.PEERS_DIR.parent
    harness = tmp_path / "terminated_run.py"
    harness.write_text(TERMINATED_HARNESS.format(root=str(root), run=str(root / "bench" / "run.py")))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(root / "bench" / "cuda.py"), str(out), "--device", "cpu", "--total", "120",
                    "--margin", "10", "--steps", "1", "--repeats", "1", "--mode", "eager",
                    "--plan", "vae:8", "gan-2d:8", "vae:16", "--harness", str(harness)],
                   check=True, capture_output=True, text=True, cwd=str(root),
                   env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    rows = {(r["model"], r["batch_size"], r["mode"]): r for r in json.loads((out / "cuda.json").read_text())["results"]}
    assert rows[("vae", 8, "eager")]["error"] is None and rows[("vae", 16, "eager")]["error"] is None
    assert rows[("gan-2d", 8, "eager")]["error"].startswith("killed at the time limit")
    first_attempt = json.loads((out / "cuda-1.json").read_text())
    assert first_attempt["machine"]["complete"] is False  # written before the exit


def test_cuda_driver_survives_a_crashed_process(tmp_path):
    import subprocess
    import sys
    root = bench.PEERS_DIR.parent
    harness = tmp_path / "crashing_run.py"
    harness.write_text(CRASHING_HARNESS.format(root=str(root), run=str(root / "bench" / "run.py")))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(root / "bench" / "cuda.py"), str(out), "--device", "cpu", "--total", "120",
                    "--margin", "10", "--steps", "1", "--repeats", "1", "--mode", "eager", "--mode", "compiled-ro",
                    "--plan", "vae:8", "gan-2d:8", "vae:16", "--harness", str(harness)],
                   check=True, capture_output=True, text=True, cwd=str(root),
                   env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})  # gen.mkl_amd's shim
    merged = json.loads((out / "cuda.json").read_text())
    rows = {(r["model"], r["batch_size"], r["mode"]): r for r in merged["results"]}
    assert rows[("vae", 8, "eager")]["error"] is None and rows[("vae", 16, "eager")]["error"] is None
    assert rows[("gan-2d", 8, "eager")]["error"].startswith("crashed (exit status 3)")
    assert len(merged["machines"]) == 2  # the second process carried on after the crash
    assert "attempt 2" in (out / "cuda.log").read_text()


def test_cuda_driver_stops_at_once_when_the_harness_refuses_the_run(tmp_path):
    """A refusal before anything is timed (no CUDA device, an unknown mode) is no crash: restarting
    would be refused again. The driver stops with the harness's one line and a non-zero status."""
    import subprocess
    import sys
    root = bench.PEERS_DIR.parent
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(root / "bench" / "cuda.py"), str(out), "--device", "cpu",
                           "--mode", "fast", "--plan", "vae:8", "gan-2d:8"], capture_output=True, text=True,
                          cwd=str(root), env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and done.stderr.startswith("error: unknown mode 'fast'")
    assert "attempt 2" not in done.stdout and "crashed" not in done.stdout and not (out / "cuda.json").exists()


def test_cuda_sh_exits_with_the_drivers_status(tmp_path):
    """bench/cuda.sh prints where the results are, then exits as bench/cuda.py did: a refused run
    is not a success for the script that called it."""
    import subprocess
    import sys
    root = bench.PEERS_DIR.parent
    done = subprocess.run(["bash", str(root / "bench" / "cuda.sh"), "--mode", "fast", "--plan", "vae:8"],
                          capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "TOTAL": "200", "PYTHON": sys.executable,
                               "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "error: " in done.stderr and "results in" in done.stdout


def test_the_table_prints_rows_that_never_ran_whole_when_piped(capsys, monkeypatch):
    """bench/cuda.py's rows for crashed or skipped groups have no matmul peak. Output that is not a
    terminal (here pytest's capture) gets a table wide enough for every column and cell."""
    monkeypatch.delenv("COLUMNS", raising=False)
    bench.print_table([harness.error_row("vae", 8, "eager", torch.device("cpu"), "crashed (exit status 3)")])
    out = capsys.readouterr().out
    assert "crashed (exit status 3)" in out and "samples/s (min–max)" in out and "compile cold/warm s" in out


def test_cuda_driver_reads_its_plan_as_gen_bench_reads_models(tmp_path):
    import subprocess
    import sys
    cuda = [sys.executable, str(bench.PEERS_DIR / "cuda.py"), str(tmp_path / "out"), "--device", "cpu"]
    for entries, error in ((["vae:abc"], "error: --plan: bad model entry 'vae:abc': use MODEL or MODEL:B1,B2"),
                           (["vae:0"], "error: --plan: bad model entry 'vae:0': batch sizes must be at least 1"),
                           ([], "error: --plan: no entries")):  # not every model, as gen bench reads none
        done = subprocess.run(cuda + ["--plan", *entries], capture_output=True, text=True)
        assert done.returncode != 0 and done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr
        assert not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("")
    for args, error in (([str(tmp_path / "a-file"), "--plan", "vae"], f"error: cannot write into {tmp_path / 'a-file'} "),
                        ([str(tmp_path / "out"), "--total", "nan"], "error: --total nan is not a non-negative number"),
                        ([str(tmp_path / "out"), "--margin", "-1"], "error: --margin -1.0 is not a non-negative")):
        done = subprocess.run([*cuda[:2], *args, "--device", "cpu"], capture_output=True, text=True)
        assert done.returncode != 0 and done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr
    # A model alone gets its default batch sizes (here refused at once by the harness, for an unknown mode).
    done = subprocess.run(cuda + ["--plan", "gan-2d", "vae:8,16", "--mode", "fast"], capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert "attempt 1: 3 group(s)" in done.stdout and " gan-2d:256 vae:8 vae:16 --device" in done.stdout


def test_the_harness_arithmetic_on_scripted_timings(tmp_path, monkeypatch, capsys):
    # Every measured number replaced by a script, so each figure the harness derives can be checked
    # exactly: samples/s from the median round (not the mean), ms/step, GFLOP/s for every model of a
    # vmap-N row, the matmul peak as the median over all samples (the start's and one per round) of
    # the faster library, the rotating order of the modes in each round, and cold/warm compile
    # seconds on the `compiled` row only.
    modes = ["compiled", "eager", "vmap-2"]
    round_seconds = {"compiled": [1.0, 1.0, 4.0], "eager": [2.0, 8.0, 2.0], "vmap-2": [4.0, 4.0, 4.0]}
    timed = []

    class Runner:
        def __init__(self, mode):
            self.mode = mode

        def __call__(self, n):
            pass

    def scripted_time_mode(runner, steps, device):
        if steps != 7:  # the first call (1 step) and the warm-up (3 steps)
            return 0.5
        timed.append(runner.mode)
        return round_seconds[runner.mode][sum(m == runner.mode for m in timed) - 1]

    def sampler(rates):
        rates = iter(rates)
        return lambda: next(rates)

    # 7 samples at the start, then one per round: oneDNN faster in some, torch.mm in others.
    mm = [100, 100, 100, 300, 300, 300, 300, 100, 100, 100]
    onednn = [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]
    monkeypatch.setattr(harness, "matmul_samplers",
                        lambda device: {"torch.mm": sampler(mm), "oneDNN": sampler(onednn)})
    monkeypatch.setattr(harness, "make_runner", lambda mode, model, config, shape, device: Runner(mode))
    monkeypatch.setattr(harness, "time_mode", scripted_time_mode)
    monkeypatch.setattr(harness, "flops_per_step", lambda model, config, shape, batch: 3e9)
    monkeypatch.setattr(harness, "compile_seconds", lambda model, batch_size, device: (10.0, 2.0))
    path = tmp_path / "bench.json"
    results = bench.main(models=["wgan-gp"], batch_sizes=[16], steps=7, repeats=3, device="cpu",
                         json_path=str(path), modes=modes, time_budget=1000.0)
    assert timed == ["compiled", "eager", "vmap-2", "eager", "vmap-2", "compiled", "vmap-2", "compiled", "eager"]
    rows = {r["mode"]: r for r in results}
    per_step = rows["compiled"]["batches_per_step"]
    assert per_step == 5  # wgan-gp's critic takes n_critic = 5 real batches a step
    peak = statistics.median([200, 200, 200, 300, 300, 300, 300, 200, 200, 200])
    for mode, seconds in round_seconds.items():
        row, members = rows[mode], 2 if mode == "vmap-2" else 1
        samples = 16 * per_step * members * 7
        assert row["repeats"] == 3 and row["round_seconds"] == seconds and row["models"] == members
        assert row["samples_per_s"] == pytest.approx(samples / statistics.median(seconds))
        assert row["samples_per_s_min"] == pytest.approx(samples / max(seconds))
        assert row["samples_per_s_max"] == pytest.approx(samples / min(seconds))
        assert row["ms_per_step"] == pytest.approx(1000 * statistics.median(seconds) / 7)
        assert row["gflop_per_step"] == pytest.approx(3 * members)
        assert row["gflops"] == pytest.approx(3 * members / (statistics.median(seconds) / 7))
        assert row["peak_gflops"] == pytest.approx(peak)
        assert row["pct_of_peak"] == pytest.approx(100 * row["gflops"] / peak)
        assert row["first_call_s"] == 0.5
        compiled = mode == "compiled"
        assert (row["cold_compile_s"], row["warm_compile_s"]) == ((10.0, 2.0) if compiled else (None, None))
    compiled_line = next(line for line in capsys.readouterr().out.splitlines() if "│ compiled" in line)
    assert "560 (140–560)" in compiled_line and "10.0 / 2.0" in compiled_line  # median (min–max), cold / warm
    machine = json.loads(path.read_text())["machine"]
    assert machine["time_budget_s"] == 1000.0 and "load_average_after" in machine
    assert machine["matmul_gflops_at_start"] == {"torch.mm": 300, "oneDNN": 200}


def test_the_input_pool_holds_distinct_draws():
    family, config, shape = bench.model_config("wgan-gp", 8)
    pool = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))
    assert len(pool) == modes_module.POOL
    batches = [batch for batch, _ in pool]
    noises = [torch.cat([v.flatten() for v in inputs.values()]) for _, inputs in pool]
    for i in range(len(pool)):
        for j in range(i):
            assert not torch.equal(batches[i], batches[j]) and not torch.equal(noises[i], noises[j])


@pytest.mark.parametrize("mode, donated", [("compiled", True), ("compiled-bf16", True), ("undonated", False)])
def test_compiled_modes_lay_out_their_batches_and_donate_as_gen_train_does(monkeypatch, mode, donated):
    # The compiler replaced by a recorder: which donation each mode asks for, and whether every
    # batch the step sees went through the layout compile_for_training returned (channels-last).
    asked, seen = [], []

    def recording_compile(step, state, device, donate, mode=None):
        asked.append(donate)

        def stepped(state, batch, inputs):
            seen.append(batch)
            metrics = {"loss": torch.zeros(())}
            return metrics if donate else (state, metrics)
        return stepped, state, lambda batch: ("laid out", batch)

    monkeypatch.setattr(modes_module, "compile_for_training", recording_compile)
    family, config, shape = bench.model_config("vae", 4)
    bench.make_runner(mode, "vae", config, shape, torch.device("cpu"))(5)
    assert asked == [donated]
    assert len(seen) == 5 and all(isinstance(b, tuple) and b[0] == "laid out" for b in seen)


def test_the_matmul_peak_counts_two_n_cubed_flops(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(machine_module.time, "perf_counter", lambda: next(ticks) * 0.5)  # each product: 0.5 s
    samplers = machine_module.matmul_samplers("cpu", size=4)
    assert samplers and all(sample() == pytest.approx(2 * 4 ** 3 / 0.5 / 1e9) for sample in samplers.values())


def test_the_compile_probe_runs_cold_then_warm_in_one_fresh_cache(monkeypatch):
    calls = []

    def fake_run(command, env, **kwargs):
        calls.append(env["TORCHINDUCTOR_CACHE_DIR"])
        hit = len(calls) == 2
        seconds = 20.0 if len(calls) == 1 else 3.0
        return subprocess.CompletedProcess(command, 0, json.dumps(
            {"seconds": seconds, "cache": {"inductor.fxgraph_cache_hit": int(hit)}}) + "\n", "")

    monkeypatch.setattr(compile_time.subprocess, "run", fake_run)
    assert compile_time.compile_seconds("vae", 16, torch.device("cpu")) == (20.0, 3.0)
    assert len(calls) == 2 and calls[0] == calls[1] and "gen-bench-cache-" in calls[0]


def test_the_compile_probe_compiles_as_gen_train_does(monkeypatch):
    asked = []

    def recording_compile(step, state, device, donate, mode=None):
        asked.append(donate)
        return (lambda state, batch, inputs: {}), state, (lambda batch: batch)

    monkeypatch.setattr(compile_time, "compile_for_training", recording_compile)
    assert compile_time.compile_probe("vae", 4, "cpu") >= 0
    assert asked == [True]


def test_the_wgan_gp_peer_makes_n_critic_critic_updates_and_one_generator_update():
    _, config, shape = bench.model_config("wgan-gp", 8)
    family = models.get("wgan-gp")
    peer = peers.build("wgan-gp", config, shape, "cpu")
    steps = {"D": 0, "G": 0}
    peer.optimizerD.register_step_post_hook(lambda *args: steps.__setitem__("D", steps["D"] + 1))
    peer.optimizerG.register_step_post_hook(lambda *args: steps.__setitem__("G", steps["G"] + 1))
    (batch, _), = bench.synthetic_inputs(family, config, shape, torch.device("cpu"))[:1]
    peer.step(batch)
    assert config.n_critic == 5 and steps == {"D": 5, "G": 1}


@pytest.mark.parametrize("model", list(bench.MODELS))
def test_the_peers_optimizers_take_the_configs_learning_rate_and_betas(model):
    _, config, shape = bench.model_config(model, 8)
    config = replace(config, lr=3e-4, b1=0.3, b2=0.95)
    peer = peers.build(model, config, shape, "cpu")
    optimizers = [getattr(peer, name) for name in ("optimizer", "optimizerD", "optimizerG") if hasattr(peer, name)]
    assert optimizers
    for optimizer in optimizers:
        assert all(group["lr"] == 3e-4 and group["betas"] == (0.3, 0.95) for group in optimizer.param_groups)



STANDIN_HARNESS = '''
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STANDIN_ARGV"], "a") as log:  # one line per process the driver started
    log.write(json.dumps(args) + "\\n")
groups = args[:args.index("--device")]
modes = [args[i + 1] for i, arg in enumerate(args) if arg == "--mode"]
finished = groups[:int(os.environ.get("STANDIN_GROUPS", len(groups)))]
rows = [{"model": g.split(":")[0], "batch_size": int(g.split(":")[1]), "mode": mode, "device": "cpu",
         "error": "from the stand-in"} for g in finished for mode in modes]
with open(args[args.index("--json") + 1], "w") as file:
    json.dump({"machine": {"cpu": "stand-in", "cores": 1, "torch": "0"}, "results": rows}, file)
sys.exit(int(os.environ.get("STANDIN_EXIT", "0")))
'''


def run_cuda_driver(tmp_path, *args, cwd=None, **env):
    """bench/cuda.py with the stand-in harness (no torch, no timing): what it was asked, what it wrote."""
    standin = tmp_path / "standin_run.py"
    standin.write_text(STANDIN_HARNESS)
    argv = tmp_path / "argv.jsonl"
    done = subprocess.run([sys.executable, str(bench.PEERS_DIR / "cuda.py"), *args, "--device", "cpu",
                           "--harness", str(standin)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "STANDIN_ARGV": str(argv), **env})
    calls = [json.loads(line) for line in argv.read_text().splitlines()] if argv.exists() else []
    return done, calls


def test_cuda_driver_runs_the_readme_plan_and_settings_by_default(tmp_path):
    """bench/README.md: the eight groups in priority order, six modes (cheap ones first), 30 steps ×
    5 rounds, no compile probes, --time-budget 35 s short of TOTAL (default 330 s); cuda.json keeps
    the harness's rows and its machine, tagged with the attempt."""
    out = tmp_path / "out"
    done, calls = run_cuda_driver(tmp_path, str(out))
    assert done.returncode == 0, done.stderr
    (args,) = calls
    assert args[:args.index("--device")] == ["vae:128", "dcgan:64", "vae:4096", "conv-vae:128", "gan-2d:256",
                                             "wgan-gp:256", "dcgan:512", "conv-vae:1024"]
    modes = [args[i + 1] for i, arg in enumerate(args) if arg == "--mode"]
    assert modes == ["module", "eager", "undonated", "compiled", "compiled-ro", "compiled-bf16"]
    assert args[args.index("--steps") + 1] == "30" and args[args.index("--repeats") + 1] == "5"
    assert "--no-compile-times" in args
    assert 330 - 35 - 15 < float(args[args.index("--time-budget") + 1]) <= 330 - 35
    merged = json.loads((out / "cuda.json").read_text())
    assert merged["machines"] == [{"attempt": 1, "cpu": "stand-in", "cores": 1, "torch": "0"}]
    assert len(merged["results"]) == 8 * 6 and {r["error"] for r in merged["results"]} == {"from the stand-in"}


@pytest.mark.parametrize("total", ["0", "20"])
def test_cuda_driver_skips_the_groups_it_has_no_time_for(tmp_path, total):
    """Under 30 s left no harness is started: every group is a row `skipped: time budget spent`."""
    out = tmp_path / "out"
    done, calls = run_cuda_driver(tmp_path, str(out), "--total", total, "--plan", "vae:8", "gan-2d:8",
                                  "--mode", "eager", "--mode", "module")
    assert done.returncode == 0, done.stderr
    assert calls == [] and "2 group(s) not started" in done.stdout
    merged = json.loads((out / "cuda.json").read_text())
    assert merged["machines"] == []
    assert merged["results"] == [{**dict.fromkeys(bench.ROW_FIELDS), "model": model, "batch_size": 8, "mode": mode,
                                  "device": "cpu", "error": "skipped: time budget spent"}
                                 for model in ("vae", "gan-2d") for mode in ("eager", "module")]


def test_cuda_driver_records_what_a_harness_left_out(tmp_path):
    """A harness that exits 0 without some groups gets them as error rows (no second attempt); one
    that dies after its last group (exit status 3) leaves the results it wrote, and the driver ends."""
    out = tmp_path / "out"
    done, calls = run_cuda_driver(tmp_path, str(out), "--plan", "vae:8", "gan-2d:8", "--mode", "eager",
                                  STANDIN_GROUPS="1")
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1
    rows = {(r["model"], r["batch_size"]): r for r in json.loads((out / "cuda.json").read_text())["results"]}
    assert rows[("vae", 8)]["error"] == "from the stand-in"
    assert rows[("gan-2d", 8)]["error"] == "missing from the harness's output"
    (tmp_path / "argv.jsonl").unlink()
    done, calls = run_cuda_driver(tmp_path, str(out), "--plan", "vae:8", "gan-2d:8", "--mode", "eager",
                                  STANDIN_EXIT="3")
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1 and "attempt 1: exit status 3 after its last group" in done.stdout
    results = json.loads((out / "cuda.json").read_text())["results"]
    assert [r["error"] for r in results] == ["from the stand-in"] * 2


def test_cuda_driver_takes_a_relative_out_dir_from_where_it_is_run(tmp_path):
    """The harness runs from the repository root; OUT_DIR is the caller's, as the usage line says."""
    done, calls = run_cuda_driver(tmp_path, "out", "--plan", "vae:8", "--mode", "eager", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls[0][calls[0].index("--json") + 1] == str(tmp_path / "out" / "cuda-1.json")
    results = json.loads((tmp_path / "out" / "cuda.json").read_text())["results"]
    assert [r["error"] for r in results] == ["from the stand-in"]


def test_cuda_driver_sends_sigterm_at_its_time_limit_then_sigkill(tmp_path):
    """run_until: past the limit the harness gets SIGTERM (bench/run.py then writes what it has and
    exits 143); one that ignores it is killed 5 s later. Its output goes to the log."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_cuda", bench.PEERS_DIR / "cuda.py")
    cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda)
    log = tmp_path / "cuda.log"
    writes = ("import signal, sys, time\n"
              "def stop(signum, frame):\n"
              "    print('terminated: writing what it has', flush=True)\n"
              "    sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "time.sleep(20)\n")
    assert cuda.run_until([sys.executable, "-c", writes], log, timeout=3) == 143
    assert "terminated: writing what it has" in log.read_text()
    ignores = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(20)\n"
    assert cuda.run_until([sys.executable, "-c", ignores], log, timeout=3) == -signal.SIGKILL


RECORDING_RUN_PY = '''
import json, runpy, sys
sys.path.insert(0, {root!r})
from gen import mkl_amd

def load():  # bench/run.py calls it before it imports gen.bench; gen.bench.main is swapped in here
    print(json.dumps({{"torch_imported_before_load": "torch" in sys.modules}}), flush=True)
    import gen.bench
    gen.bench.main = lambda **kwargs: print(json.dumps(kwargs), flush=True)

mkl_amd.load = load
sys.argv[0] = {run!r}
runpy.run_path({run!r}, run_name="__main__")
'''


def test_run_py_hands_its_options_to_gen_bench(tmp_path):
    """bench/run.py is `gen bench` from a checkout: MKL's shim first, then the same defaults
    (device auto, 20 steps, 5 rounds, compile probes on, no time budget) and every option passed on."""
    root = bench.PEERS_DIR.parent
    script = tmp_path / "recording_run.py"
    script.write_text(RECORDING_RUN_PY.format(root=str(root), run=str(root / "bench" / "run.py")))

    def kwargs_of(*args):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        first, passed = [json.loads(line) for line in done.stdout.splitlines()]
        assert first == {"torch_imported_before_load": False}
        return passed

    defaults = kwargs_of()
    assert not defaults.pop("models")  # none given: every model (None or [] alike)
    assert defaults == {"batch_sizes": None, "steps": 20, "repeats": 5, "device": "auto", "json_path": None,
                        "modes": None, "measure_compile": True, "time_budget": None}
    given = kwargs_of("vae:8", "gan-2d", "--batch-size", "4", "--batch-size", "6", "--steps", "3", "--repeats", "2",
                      "--mode", "eager", "--mode", "module", "--device", "cpu", "--json", "x.json",
                      "--no-compile-times", "--time-budget", "12.5")
    assert given == {"models": ["vae:8", "gan-2d"], "batch_sizes": [4, 6], "steps": 3, "repeats": 2, "device": "cpu",
                     "json_path": "x.json", "modes": ["eager", "module"], "measure_compile": False,
                     "time_budget": 12.5}


def test_run_py_ends_a_sigterm_run_like_ctrl_c(tmp_path):
    """SIGTERM (from `timeout`) in the second group: the finished group is printed and written, and the
    exit status is the shell's for SIGTERM (143), not a signal death."""
    root = bench.PEERS_DIR.parent
    script = tmp_path / "terminated_run.py"
    script.write_text(TERMINATED_HARNESS.format(root=str(root), run=str(root / "bench" / "run.py")))
    path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(script), "vae:8", "gan-2d:8", "--device", "cpu", "--mode", "eager",
                           "--steps", "1", "--repeats", "1", "--no-compile-times", "--json", str(path)],
                          capture_output=True, text=True, cwd=str(root),
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "interrupted: writing the groups finished so far" in done.stdout
    written = json.loads(path.read_text())
    assert [r["model"] for r in written["results"]] == ["vae"] and written["machine"]["complete"] is False


def test_speedups_are_per_model_and_batch_size():
    """× module divides by the module row of the same model and batch size; a group without one
    (or whose module failed) gets no ratio."""
    def row(model, batch, mode, rate, error=None):
        return {"model": model, "batch_size": batch, "mode": mode, "samples_per_s": rate, "error": error}
    rows = [row("vae", 16, "module", 100.0), row("vae", 16, "compiled", 300.0),
            row("vae", 32, "module", 400.0), row("vae", 32, "compiled", 600.0),
            row("vae", 64, "compiled", 50.0),  # no peer in this group
            row("gan-2d", 16, "module", None, "RuntimeError: boom"), row("gan-2d", 16, "eager", 10.0)]
    assert report.speedups(rows) == {("vae", 16, "module"): 1.0, ("vae", 16, "compiled"): 3.0,
                                     ("vae", 32, "module"): 1.0, ("vae", 32, "compiled"): 1.5}


def test_the_table_shows_each_rows_figures_and_the_machine(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)

    def row(mode, rate, pct):
        return {**dict.fromkeys(bench.ROW_FIELDS), "model": "vae", "batch_size": 128, "mode": mode, "device": "cuda",
                "samples_per_s": rate, "samples_per_s_min": rate - 10, "samples_per_s_max": rate + 10,
                "ms_per_step": 1.25, "gflops": 450.0, "pct_of_peak": pct, "peak_gflops": 1000.0,
                "first_call_s": 8.25, "peak_memory_mb": 512.0, "error": None}
    bench.print_table([row("module", 1000.0, 45.0), row("compiled", 3000.0, 30.0)],
                      {"cpu": "Xeon", "cores": 16, "torch": "2.11.0", "gpu": "NVIDIA H100 80GB HBM3"})
    out = capsys.readouterr().out
    assert "Xeon, 16 cores, torch 2.11.0, NVIDIA H100 80GB HBM3" in " ".join(out.split())  # the title may wrap
    cells = {line.split("│")[3].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
             for line in out.splitlines() if line.startswith("│ vae")}
    # model, batch, mode, samples/s (min–max), × module, ms/step, GFLOP/s, % peak, compile, first call, peak MB
    assert cells["module"] == ["vae", "128", "module", "1,000 (990–1,010)", "1.00", "1.25", "450.0", "45%", "", "8.2",
                               "512"]
    assert cells["compiled"][3:8] == ["3,000 (2,990–3,010)", "3.00", "1.25", "450.0", "30%"]
    assert "peak MB: CUDA max allocated; float32 matmul peak 1000.0 GFLOP/s" in out


def test_a_json_link_into_a_missing_directory_is_refused_before_the_run(tmp_path, monkeypatch):
    """The link is followed before the run: its file's directory is the one checked."""
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "missing" / "real.json")
    with pytest.raises(ValueError, match="the directory .*missing does not exist: create it"):
        harness.main(models=["gan-2d"], json_path=str(link))


def test_json_dev_stdin_is_refused_as_a_stream(monkeypatch):
    monkeypatch.setattr(harness, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="--json /dev/stdin is one of the process's streams, not a file"):
        harness.main(models=["gan-2d"], json_path="/dev/stdin")

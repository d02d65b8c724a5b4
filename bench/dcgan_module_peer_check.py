"""DCGAN training step: gen's compiled functional step against an eager nn.Module peer.

The peer is the pytorch/examples DCGAN loop for the same spec (tests/test_gan.py
checks that the two networks compute the same function): BCE-with-logits on
D(x) and D(G(z)), Adam(2e-4, 0.5, 0.999), then the non-saturating G update,
with G re-run on fresh noise as gen's step does. Burn-in, then timed steps.

    python bench/dcgan_module_peer_check.py [--steps 30] [--threads 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gen import gan, models, rng  # noqa: E402
from gen.config import Config, resolve  # noqa: E402
from test_gan import ModuleDiscriminator, ModuleGenerator  # noqa: E402


def module_step(g_module, d_module, g_optimizer, d_optimizer, real, z_d, z_g):
    real = real * 2 - 1
    d_optimizer.zero_grad()
    with torch.no_grad():
        fake = g_module(z_d)
    real_logits, fake_logits = d_module(real), d_module(fake)
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    d_loss.backward()
    d_optimizer.step()
    g_optimizer.zero_grad()
    fake_logits = d_module(g_module(z_g))
    g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    g_loss.backward()
    g_optimizer.step()
    return d_loss.detach(), g_loss.detach()


def time_steps(run, steps: int, warmup: int) -> float:
    for i in range(warmup):
        run(i)
    start = time.perf_counter()
    for i in range(steps):
        run(warmup + i)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, batch_size = (1, 28, 28), 64
    config = resolve(Config(model="dcgan", data="fashion-mnist"), models.get("dcgan").defaults)
    real = torch.rand(batch_size, *shape, generator=torch.Generator().manual_seed(0))
    inputs = [gan.make_noise(config, shape, batch_size, rng.generator(0, "noise", i)) for i in range(8)]

    state = gan.init(config, shape, 0)
    step = torch.compile(gan.make_step(config, shape), fullgraph=True, dynamic=False)
    holder = {"state": state}

    def functional(i):
        holder["state"], metrics = step(holder["state"], real, inputs[i % 8])
        return metrics

    start = time.perf_counter()
    functional(0)
    compile_s = time.perf_counter() - start
    functional_ms = time_steps(functional, args.steps, warmup=3)

    g_module, d_module = ModuleGenerator(), ModuleDiscriminator()
    g_optimizer = torch.optim.Adam(g_module.parameters(), 2e-4, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(d_module.parameters(), 2e-4, betas=(0.5, 0.999))
    module_ms = time_steps(lambda i: module_step(g_module, d_module, g_optimizer, d_optimizer, real,
                                                 inputs[i % 8]["z_discriminator"][0], inputs[i % 8]["z_generator"]),
                           args.steps, warmup=3)
    print(f"threads {args.threads}, batch {batch_size}: compile {compile_s:.1f} s; "
          f"functional compiled {functional_ms:.1f} ms/step; nn.Module eager {module_ms:.1f} ms/step; "
          f"ratio module/functional {module_ms / functional_ms:.2f}")


if __name__ == "__main__":
    main()

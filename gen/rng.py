"""Explicit randomness: every random number gen uses comes from a seed and a path.

`seed_for(seed, "noise", step)` folds names and integers into one 63-bit seed,
like `jax.random.fold_in`, so the noise for step 1000 of run seed 3 is the
same whether the run got there in one go or resumed from a checkpoint, and
compiled and eager steps receive identical inputs. The global torch RNG is
never used.
"""

import hashlib

import torch


def seed_for(seed: int, *path: str | int) -> int:
    text = "/".join([str(seed), *map(str, path)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *path: str | int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_for(seed, *path))

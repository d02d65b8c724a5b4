"""gen.rng: the seeds every data order and noise draw derives from."""

import hashlib

from gen import rng


def test_seeds_are_the_documented_hash_of_the_path():
    """seed_for is a format: checkpoints resume on the numbers it gives, so a run resumed by a later
    gen sees the data order and noise the first gen would have. Its definition, 63 bits of
    BLAKE2b-64 over "seed/name/step", is pinned here."""
    digest = hashlib.blake2b(b"3/noise/1000", digest_size=8).digest()
    assert rng.seed_for(3, "noise", 1000) == int.from_bytes(digest, "little") >> 1
    assert 0 <= rng.seed_for(-2**63, "noise", 2**64 - 1) < 2**63  # what torch.Generator takes


def test_different_paths_give_different_seeds():
    """The separator keeps ("ab", "c") and ("a", "bc") apart, and every part of the path counts."""
    assert rng.seed_for(0, "ab", "c") != rng.seed_for(0, "a", "bc")
    seeds = {rng.seed_for(seed, name, step) for seed in (0, 1) for name in ("noise", "data") for step in (0, 1)}
    assert len(seeds) == 8

"""One run's configuration: a frozen dataclass, saved as JSON beside every checkpoint.

Fields left as None take the model family's default (`resolve`), so
`gen train dcgan` gets DCGAN's Adam(2e-4, β1=0.5) and batch 64 while
`gen train vae` gets the pytorch/examples VAE's Adam(1e-3) and batch 128.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    model: str = "vae"
    data: str = "digits"
    data_dir: str | None = None
    epochs: int | None = None        # one of epochs/steps sets the run's length
    steps: int | None = None
    batch_size: int | None = None
    optimizer: str = "adam"          # adam | adamw | sgd
    lr: float | None = None
    b1: float | None = None
    b2: float | None = None
    weight_decay: float | None = None  # adamw's decoupled decay (default 1e-2, torch.optim.AdamW's); 0 otherwise
    momentum: float = 0.9            # sgd only
    lr_schedule: str | None = None   # constant | linear | cosine: decays lr to 0 over decay_steps
    decay_steps: int | None = None   # filled by the training loop with the run's length
    seed: int = 0
    # VAE family
    latent_dim: int | None = None
    hidden_dim: int | None = None
    beta: float = 1.0
    iwae_k: int = 1
    # GAN family
    gan_loss: str | None = None      # minimax | non-saturating | wasserstein | hinge
    n_critic: int | None = None
    gp_weight: float = 10.0
    pack: int | None = None          # PacGAN: the discriminator judges `pack` samples jointly
    ema_decay: float | None = None   # > 0: also keep an exponential moving average of G's weights
    # running
    compile: bool = True
    device: str = "auto"
    precision: str = "float32"       # float32 | bf16: the step's matmuls and convolutions in bfloat16
    log_every: int = 50
    sample_every: int = 0            # 0: no intermediate sample grids
    eval_samples: int = 2500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from its JSON form (a checkpoint's), unknown keys ignored; a value of the wrong
        type (e.g. a string batch size) is a ValueError here, not a TypeError deep in training."""
        hints = typing.get_type_hints(cls)
        known = {}
        for name, value in values.items():
            if name not in hints:
                continue
            allowed = typing.get_args(hints[name]) or (hints[name],)
            if float in allowed:
                allowed = (*allowed, int)  # an integer is a valid float (lr: 1)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"the run's config has {name}={value!r}, which is not a valid value: "
                                 "the checkpoint's metadata is damaged; use another checkpoint")
            known[name] = value
        return cls(**known)


# Defaults for every family, where the family's own defaults say nothing.
COMMON_DEFAULTS = {"lr_schedule": "constant", "ema_decay": 0.0}
ADAMW_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default


def resolve(config: Config, defaults: dict) -> Config:
    """Fill every None field that the model family (else COMMON_DEFAULTS) has a default for,
    except the run's length (epochs/steps), which depends on the data too (gen/train.py)."""
    defaults = {**COMMON_DEFAULTS, **defaults,
                "weight_decay": ADAMW_WEIGHT_DECAY if config.optimizer == "adamw" else 0.0}
    filled = {k: v for k, v in defaults.items() if getattr(config, k) is None and k not in ("epochs", "steps")}
    return dataclasses.replace(config, **filled)


# The most a size option may be: a tensor dimension that large already asks for terabytes, and a
# Python integer past int64 would reach torch as an overflow, not as a one-line error.
MAX_SIZE = 2**31 - 1


def validate(config: Config) -> None:
    """Raise ValueError with a one-line message for settings that cannot work."""
    finite = math.isfinite
    sizes = {"batch_size": config.batch_size, "latent_dim": config.latent_dim, "hidden_dim": config.hidden_dim,
             "iwae_k": config.iwae_k, "n_critic": config.n_critic, "pack": config.pack}
    for name, size in sizes.items():
        if size is not None and size > MAX_SIZE:
            raise ValueError(f"--{name.replace('_', '-')} {size} is too large: the most is {MAX_SIZE:,}, "
                             "and far less fits in memory")
    checks = [
        (-2**63 <= config.seed < 2**64, "--seed must be between -2^63 and 2^64 - 1"),  # what torch.Generator takes
        (config.batch_size is None or config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.lr is None or 0 < config.lr < math.inf, "--lr must be positive and finite"),
        (config.epochs is None or config.epochs >= 1, "--epochs must be at least 1"),
        (config.steps is None or config.steps >= 1, "--steps must be at least 1"),
        (not (config.epochs and config.steps), "give --epochs or --steps, not both"),
        (config.iwae_k >= 1, "--iwae-k must be at least 1"),
        (finite(config.beta) and config.beta >= 0, "--beta must be non-negative and finite"),
        (config.iwae_k == 1 or config.beta == 1.0, "--beta weights the ELBO's KL term; IWAE (--iwae-k > 1) "
                                                   "has no such term, so drop one of the two"),
        (config.optimizer in ("adam", "adamw", "sgd"), "--optimizer must be adam, adamw or sgd"),
        (config.weight_decay is None or (finite(config.weight_decay) and config.weight_decay >= 0),
         "--weight-decay must be non-negative and finite"),
        (not config.weight_decay or config.optimizer == "adamw",
         "--weight-decay is AdamW's decoupled decay: use it with --optimizer adamw"),
        (config.lr_schedule in (None, "constant", "linear", "cosine"), "--lr-schedule must be constant, linear or cosine"),
        (config.decay_steps is None or config.decay_steps >= 1, "decay_steps must be at least 1"),
        (config.ema_decay is None or 0.0 <= config.ema_decay < 1.0, "--ema-decay must be in [0, 1): 0 turns the average off"),
        (config.gan_loss in (None, "minimax", "non-saturating", "wasserstein", "hinge"),
         "--gan-loss must be minimax, non-saturating, wasserstein or hinge"),
        (finite(config.gp_weight) and config.gp_weight >= 0, "--gp-weight must be non-negative and finite"),
        (config.latent_dim is None or config.latent_dim >= 1, "--latent-dim must be at least 1"),
        (config.hidden_dim is None or config.hidden_dim >= 1, "--hidden-dim must be at least 1"),
        (config.n_critic is None or config.n_critic >= 1, "--n-critic must be at least 1"),
        (config.pack is None or config.pack >= 1, "--pack must be at least 1"),
        (config.pack in (None, 1) or (config.batch_size or 0) % config.pack == 0,
         "--batch-size must be a multiple of --pack"),
        (config.precision in ("float32", "bf16"), "--precision must be float32 or bf16"),
        # Settings no option sets (a family's defaults, or a hand-edited config.json/checkpoint):
        # Adam's β's and SGD's momentum are averaging weights, a bias correction 1 - βᵗ must not be 0.
        (config.b1 is None or 0.0 <= config.b1 < 1.0, "b1 must be in [0, 1)"),
        (config.b2 is None or 0.0 <= config.b2 < 1.0, "b2 must be in [0, 1)"),
        (0.0 <= config.momentum < 1.0, "momentum must be in [0, 1)"),
        (1 <= config.eval_samples <= MAX_SIZE, f"eval_samples must be between 1 and {MAX_SIZE:,}"),
        (config.log_every >= 1, "--log-every must be at least 1"),
        (config.sample_every >= 0, "--sample-every must be 0 (off) or positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)

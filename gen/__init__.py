"""gen: generative models (VAEs and GANs) as pure functions over dicts of tensors."""

__version__ = "0.1.0"

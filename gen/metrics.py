"""Sample-quality metrics that need no trained network: mode coverage on 2D Gaussian mixtures.

The definitions are those of VEEGAN (Srivastava et al. 2017, §5.1) and PacGAN
(Lin et al. 2018, §5.1), which report them on the same grid of 25 Gaussians:

- a sample is *high quality* when it lies within 3 standard deviations of the
  mode nearest to it, ‖x - μ_nearest‖ < 3σ (a real sample is, with
  probability 1 - e^{-9/2} ≈ 98.9%, in 2D);
- a mode is *captured* when at least 20 of 2,500 generated samples are high
  quality samples assigned to it (for n samples: 20 · n / 2500);
- the *reverse KL* is KL(p̂ ‖ uniform) between the generated mode frequencies
  (high-quality samples only, PacGAN's convention) and the uniform mixture
  weights: 0 when every mode receives the same share. With no high-quality
  sample there are no frequencies and the KL is undefined: it is left out
  (an infinity would not be JSON, and the run log is JSON).
"""

import torch
from torch import Tensor


def mode_coverage(samples: Tensor, modes: Tensor, std: float, n_stds: float = 3.0,
                  min_per_mode: float = 20.0, per_samples: int = 2500) -> dict[str, float]:
    """Modes captured, high-quality percentage and reverse KL of 2D samples (N, 2) against modes (M, 2)."""
    if len(samples) == 0:  # no sample would count every mode as captured, at a NaN percentage
        raise ValueError("mode coverage needs at least one sample: draw some, e.g. 2,500")
    samples, modes = samples.detach().float().cpu(), modes.float().cpu()
    # ‖x - μ‖ from the differences themselves: cdist's default, above 25 rows, takes the root of
    # ‖x‖² + ‖μ‖² - 2x·μ, whose float32 cancellation moves samples near the 3σ circle across it
    # and makes a sample's quality depend on how many samples are judged with it.
    distances = torch.cdist(samples, modes, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    nearest_distance, nearest = distances.min(dim=1)              # (N,), (N,)
    high_quality = nearest_distance < n_stds * std                # within 3σ of the nearest mode
    counts = torch.bincount(nearest[high_quality], minlength=len(modes)).float()  # (M,)
    threshold = min_per_mode * len(samples) / per_samples         # 20 per 2,500 samples
    frequencies = counts / counts.sum().clamp(min=1)
    # KL(p̂ ‖ u) = Σ_m p̂_m log(p̂_m · M), with 0 log 0 = 0
    reverse_kl = torch.where(frequencies > 0, frequencies * torch.log(frequencies * len(modes)), 0.0).sum()
    coverage = {
        "modes_captured": int((counts >= threshold).sum()),
        "n_modes": len(modes),
        "high_quality_pct": 100.0 * high_quality.float().mean().item(),
    }
    if counts.sum() > 0:
        coverage["reverse_kl"] = reverse_kl.item()
    return coverage

import math

import pytest
import torch

from gen.data import mixture_modes
from gen.metrics import mode_coverage


def test_mode_coverage_counts_high_quality_samples_per_mode():
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    std = 0.1  # high quality: closer than 0.3 to the nearest mode
    samples = torch.cat([
        torch.tensor([[0.2, 0.0]]).repeat(30, 1),    # mode 0: 30 high-quality samples
        torch.tensor([[10.0, 0.25]]).repeat(19, 1),  # mode 1: 19, one short of captured
        torch.tensor([[5.0, 5.0]]).repeat(51, 1),    # between modes: low quality
    ])
    result = mode_coverage(samples, modes, std, per_samples=100)  # 20 per 100 samples
    assert result["modes_captured"] == 1
    assert result["n_modes"] == 3
    assert result["high_quality_pct"] == pytest.approx(49.0)
    # mode frequencies among high-quality samples: (30, 19, 0) / 49
    p = torch.tensor([30 / 49, 19 / 49])
    assert result["reverse_kl"] == pytest.approx((p * torch.log(p * 3)).sum().item(), rel=1e-5)


def test_threshold_scales_with_the_number_of_samples():
    modes = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    samples = torch.cat([torch.zeros(40, 2), torch.tensor([[1.0, 0.0]]).repeat(39, 1), torch.full((4921, 2), 0.5)])
    # 5,000 samples: 40 needed per mode (20 per 2,500)
    assert mode_coverage(samples, modes, 0.01)["modes_captured"] == 1


def test_real_data_captures_every_mode_with_about_99_percent_quality():
    # P(‖x - μ‖ < 3σ) for a 2D isotropic Gaussian is 1 - exp(-9/2) ≈ 98.9%.
    modes, std = mixture_modes("grid25")
    generator = torch.Generator().manual_seed(0)
    which = torch.randint(len(modes), (2500,), generator=generator)
    samples = modes[which] + std * torch.randn(2500, 2, generator=generator)
    result = mode_coverage(samples, modes, std)
    assert result["modes_captured"] == 25
    assert result["high_quality_pct"] == pytest.approx(100 * (1 - math.exp(-4.5)), abs=0.6)
    assert result["reverse_kl"] < 0.02


def test_collapsed_samples_capture_one_mode():
    modes, std = mixture_modes("ring8")
    samples = modes[3] + 0.001 * torch.randn(2500, 2, generator=torch.Generator().manual_seed(0))
    result = mode_coverage(samples, modes, std)
    assert result["modes_captured"] == 1
    assert result["high_quality_pct"] == 100.0
    assert result["reverse_kl"] == pytest.approx(math.log(8), rel=1e-5)


def test_no_high_quality_sample_leaves_the_reverse_kl_out():
    """KL(p̂ ‖ u) needs frequencies; with every sample far from every mode there are none, and an
    infinity would not be JSON (the run log is)."""
    import json
    modes = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    coverage = mode_coverage(torch.full((50, 2), 10.0), modes, std=0.01)
    assert coverage == {"modes_captured": 0, "n_modes": 2, "high_quality_pct": 0.0}
    json.loads(json.dumps(coverage, allow_nan=False))



def test_a_sample_is_judged_the_same_alone_and_among_others():
    """‖x - μ‖ < 3σ is a property of the sample: it must not change with how many samples are judged
    together. cdist's default switches to ‖x‖² + ‖μ‖² - 2x·μ (a matmul, float32 cancellation)
    above 25 rows, which moves samples this close to the 3σ circle across it."""
    modes, std = mixture_modes("grid25")
    x = torch.tensor([[-3.980921745300293, 0.1487802267074585]])  # 0.1499985 from (-4, 0): inside 3σ = 0.15
    assert modes[2].tolist() == [-4.0, 0.0] and (x.double() - modes[2].double()).norm() < 3 * std
    assert mode_coverage(x, modes, std)["high_quality_pct"] == 100.0
    crowd = torch.cat([x, modes.repeat(100, 1)])  # 2,501 samples, all of high quality
    assert mode_coverage(crowd, modes, std)["high_quality_pct"] == 100.0


def test_non_finite_samples_are_of_low_quality():
    modes, std = mixture_modes("ring8")
    samples = torch.cat([modes.repeat(10, 1), torch.tensor([[math.nan, 0.0], [math.inf, 1.0], [-math.inf, math.nan]])])
    result = mode_coverage(samples, modes, std, per_samples=83)  # 83 samples: 20 needed per mode
    assert result["high_quality_pct"] == pytest.approx(100 * 80 / 83)
    assert result["modes_captured"] == 0  # 10 per mode
    assert result["reverse_kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_sample_exactly_3_stds_away_is_not_of_high_quality():
    """‖x - μ‖ < 3σ is strict (VEEGAN, PacGAN): a sample on the 3σ circle is not high quality.
    σ = 0.5 and these distances (1.5) are exact in float32."""
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    on_circle = torch.tensor([[1.5, 0.0], [0.0, -1.5], [8.5, 0.0]])
    inside = torch.tensor([[1.4999, 0.0]])
    assert mode_coverage(on_circle, modes, std=0.5)["high_quality_pct"] == 0.0
    assert mode_coverage(torch.cat([on_circle, inside]), modes, std=0.5)["high_quality_pct"] == 25.0


def test_samples_and_modes_of_any_float_dtype_are_judged_alike():
    """float64 samples (a numpy array's default), bfloat16 ones (a generator run under bf16
    autocast) and float64 modes give the float32 answer; cdist itself refuses mixed or bf16 inputs."""
    modes, std = mixture_modes("grid25")
    # values exact in bfloat16: the modes (even integers) and points far between them
    samples = torch.cat([modes.repeat(4, 1), torch.full((20, 2), 1.0)])
    expected = mode_coverage(samples, modes, std, per_samples=100)
    assert expected["high_quality_pct"] == pytest.approx(100.0 * 100 / 120)
    for s, m in ((samples.double(), modes), (samples.bfloat16(), modes), (samples, modes.double()),
                 (samples.double(), modes.double())):
        assert mode_coverage(s, m, std, per_samples=100) == expected, (s.dtype, m.dtype)


def test_no_samples_is_refused_rather_than_every_mode_captured():
    modes, std = mixture_modes("ring8")
    with pytest.raises(ValueError, match="mode coverage needs at least one sample"):
        mode_coverage(torch.zeros(0, 2), modes, std)

"""α–β least squares: recovers synthetic parameters, stays non-negative, refuses bad input."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from analysis.fits import fit_alpha_beta


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(1e-6, 1e-3), bw_gbps=st.floats(1.0, 500.0))
def test_recovers_alpha_beta(alpha, bw_gbps):
    sizes = np.logspace(3, 9, 13)
    beta = 1 / (bw_gbps * 1e9)
    f = fit_alpha_beta(sizes, alpha + beta * sizes)
    assert f.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert f.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    assert f.residual_rel < 1e-9 and f.n == 13


def test_noisy_fit_reports_residual_and_stays_non_negative():
    rng = np.random.default_rng(0)
    sizes = np.logspace(3, 9, 30)
    t = (2e-5 + sizes / 100e9) * rng.uniform(0.9, 1.1, sizes.size)
    f = fit_alpha_beta(sizes, t)
    assert f.alpha_s == pytest.approx(2e-5, rel=0.2) and f.bandwidth_gbps == pytest.approx(100, rel=0.1)
    assert 0.01 < f.residual_rel < 0.1
    # times falling with size would need β < 0: clipped to zero, α alone
    g = fit_alpha_beta([1e3, 1e6, 1e9], [3e-3, 2e-3, 1e-3])
    assert g.beta_s_per_byte == 0 and g.alpha_s > 0


@pytest.mark.parametrize("sizes,times", [([], []), ([1, 2], [1.0]), ([1, 2], [0.0, 1.0]),
                                         ([1, 2], [float("nan"), 1.0])])
def test_bad_input(sizes, times):
    with pytest.raises(ValueError):
        fit_alpha_beta(sizes, times)


def test_a_single_size_scales_with_bytes():
    from analysis.fits import fit_alpha_beta
    f = fit_alpha_beta([1e6], [1e-3])
    assert f.alpha_s == 0 and f.time_s(2e6) == pytest.approx(2e-3)

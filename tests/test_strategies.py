"""Target selection and guidance strategies against ALGORITHM.md's worked examples."""

import math

import pytest
import torch

from tdd_lightning.strategies import (
    ConfigError,
    DecoupledGuidance,
    L2Loss,
    LCMRangeGuidance,
    LCMSelection,
    NoGuidance,
    PCMSelection,
    PseudoHuberLoss,
    TCDSelection,
    TDDSelection,
)

CANDIDATES = {
    900: {627, 667, 715, 751, 799, 835, 859, 875},
    600: {375, 399, 431, 499, 571, 599},
    250: {0, 127, 143, 167, 199},
    100: {0},
}


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("t_prime", sorted(CANDIDATES))
def test_tdd_draws_exactly_the_candidate_set(t_prime):
    ts = TDDSelection(s_ratio=0.0)  # s = tau
    assert set(ts.candidates(t_prime)) == CANDIDATES[t_prime]
    s = ts.select(torch.full((4000,), t_prime), g(t_prime))
    assert set(s.tolist()) == CANDIDATES[t_prime]  # all reached, nothing else
    counts = torch.bincount(s)[sorted(CANDIDATES[t_prime])].double()
    assert counts.min() > 0.6 * counts.mean()  # roughly uniform


def test_tdd_offset_stays_in_range():
    ts = TDDSelection(s_ratio=0.3)
    t_prime = torch.tensor([900, 600, 250] * 2000)
    s = ts.select(t_prime, g(1))
    ts0 = TDDSelection(s_ratio=0.0)
    tau = ts0.select(t_prime, g(1))  # same generator stream: the same tau draws
    assert torch.all(s <= tau)
    assert torch.all(s >= torch.floor(0.7 * tau.double()).long())
    assert (s < tau).float().mean() > 0.9  # the offset is really applied


def test_tdd_below_smallest_point_gives_zero():
    s = TDDSelection().select(torch.tensor([0, 3, 100, 126]), g())
    assert s.tolist() == [0, 0, 0, 0]


def test_sample_times_on_grid():
    ts = TDDSelection()
    t, t_prime = ts.sample_times(5000, g(2))
    assert set(t.tolist()) <= set(ts.grid.tolist()) and len(set(t.tolist())) > 200
    assert torch.equal(t_prime, (t - 4).clamp(min=0))


def test_lcm_targets_next_grid_point():
    ts = LCMSelection()
    t, t_prime = ts.sample_times(1000, g(3))
    assert ts.k == 20 and torch.equal(t_prime, (t - 20).clamp(min=0))
    assert torch.equal(ts.select(t_prime, g()), t_prime)


def test_tcd_range_and_grid():
    ts = TCDSelection()
    t, t_prime = ts.sample_times(3000, g(4))
    s = ts.select(t_prime, g(5))
    assert torch.all(s >= 0) and torch.all(s <= t_prime)
    assert set(s.tolist()) <= {0} | set(ts.grid.tolist())
    # s is uniform over the points <= t': for t' = 999 - 20 = 979, all 50 points (0, 19, ..., 979) appear
    s = ts.select(torch.full((5000,), 979), g(6))
    assert len(set(s.tolist())) == 50


def test_pcm_phase_edges():
    ts = PCMSelection(num_phases=4)
    assert ts.edges.tolist() == [0, 251, 499, 751]
    t = torch.tensor([999, 755, 751, 503, 499, 255, 251, 3])  # grid points
    s = ts.select((t - 4).clamp(min=0))
    assert s.tolist() == [751, 751, 499, 499, 251, 251, 0, 0]


@pytest.mark.parametrize(
    "factory, key",
    [
        (lambda: TDDSelection(s_ratio=1.0), "s_ratio"),
        (lambda: TDDSelection(k_min=5, k_max=4), "k_min"),
        (lambda: TDDSelection(num_teacher_steps=300), "num_teacher_steps"),
        (lambda: DecoupledGuidance(p_empty=1.5), "p_empty"),
        (lambda: DecoupledGuidance(w_min=5, w_max=3), "w_min"),
        (lambda: DecoupledGuidance(uncond="nothing"), "uncond"),
        (lambda: PseudoHuberLoss(c=0.0), "c"),
        (lambda: PCMSelection(num_phases=0), "num_phases"),
    ],
)
def test_bad_values_name_the_key(factory, key):
    with pytest.raises(ConfigError) as e:
        factory()
    assert e.value.key == key and key in str(e.value)


def test_guidance_extremes_and_ranges():
    assert not DecoupledGuidance(p_empty=0.0).draw(1000, g()).drop.any()
    assert DecoupledGuidance(p_empty=1.0).draw(1000, g()).drop.all()
    frac = DecoupledGuidance(p_empty=0.2).draw(20000, g(1)).drop.float().mean().item()
    assert frac == pytest.approx(0.2, abs=0.015)
    assert torch.all(DecoupledGuidance(w=3.5).draw(10, g()).w == 3.5)
    w = LCMRangeGuidance().draw(5000, g(2)).w
    assert w.min() >= 3 and w.max() <= 15 and w.std() > 3
    none = NoGuidance().draw(10, g())
    assert not none.drop.any() and torch.all(none.w == 0) and not NoGuidance().uses_cfg


def test_loss_strategy_reduces_once():
    pred, target = torch.zeros(2, 4), torch.ones(2, 4)
    assert L2Loss()(pred, target).item() == 1.0
    assert PseudoHuberLoss(c=0.001)(pred, target).item() == pytest.approx(math.sqrt(1 + 1e-6) - 0.001)

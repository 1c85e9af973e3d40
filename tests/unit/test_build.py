import math

import pytest
import torch

from switchbank.build import bin_discard, build_switch, keep_count
from switchbank.combine import switch_delta
from switchbank.errors import Incompatible, InvalidInput
from tests.helpers import finetune


def brute_force(tau: torch.Tensor, alpha: float):
    """Bin-Discard written the slow, obvious way: sort each sign's entries, keep the top ones."""
    flat = tau.reshape(-1).tolist()
    keep = [False] * len(flat)
    for sign in (1, -1):
        idx = [i for i, v in enumerate(flat) if v * sign > 0]
        if not idx:
            continue
        k = int(len(idx) * (1 - alpha))
        if k == 0:
            for i in idx:
                keep[i] = True
            continue
        mags = sorted((abs(flat[i]) for i in idx), reverse=True)
        threshold = mags[k - 1]
        for i in idx:
            if abs(flat[i]) >= threshold:
                keep[i] = True
    kept = [flat[i] for i in range(len(flat)) if keep[i]]
    lam = math.sqrt(sum(v * v for v in kept) / len(kept)) if kept else 0.0
    return keep, lam


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("shape", [(7,), (33, 17), (4, 3, 5)])
def test_bin_discard_matches_brute_force(alpha, shape):
    tau = torch.randn(shape) * torch.rand(shape) ** 3
    mask, positive, lam = bin_discard(tau, alpha)
    keep, ref_lam = brute_force(tau, alpha)
    assert mask.tolist() == keep
    flat = tau.reshape(-1)
    n_pos, n_neg = int((flat > 0).sum()), int((flat < 0).sum())
    kept_pos, kept_neg = int((mask & (flat > 0)).sum()), int((mask & (flat < 0)).sum())
    # no ties in continuous random data: exactly int(n * (1 - alpha)) of each sign, or all if that is 0
    assert kept_pos == (keep_count(n_pos, alpha) or n_pos)
    assert kept_neg == (keep_count(n_neg, alpha) or n_neg)
    assert lam == pytest.approx(ref_lam, rel=1e-12)
    assert torch.equal(positive[mask], flat[mask] > 0)


def test_ties_at_threshold_are_kept():
    tau = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, -1.0, -1.0, -5.0])
    mask, _, lam = bin_discard(tau, 0.5)
    # positives: 5 of them, keep int(2.5)=2 -> threshold 2.0, and every 2.0 ties in
    # negatives: 3, keep int(1.5)=1 -> threshold 5.0
    assert mask.tolist() == [True, True, True, True, False, False, False, True]
    assert lam == pytest.approx(math.sqrt((9 + 4 * 3 + 25) / 5))


def test_zero_task_vector_gives_empty_mask():
    mask, _, lam = bin_discard(torch.zeros(10), 0.5)
    assert not mask.any() and lam == 0.0


def test_build_switch_equals_formula(tower):
    fin = finetune(tower, seed=1)
    sw = build_switch(tower, fin, "t", 0.6)
    for name, pre in tower.items():
        tau = fin[name].float() - pre.float()
        got = switch_delta(sw, name)
        if tau.dim() == 0:
            assert got is None or torch.equal(got, tau)
            continue
        mask, _, lam = bin_discard(tau, 0.6)
        expected = torch.where(mask.reshape(tau.shape), torch.sign(tau) * lam, torch.zeros_like(tau))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_build_reports_differing_buffers():
    pre = {"bn.weight": torch.ones(4), "bn.running_mean": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(3)}
    fin = {"bn.weight": torch.ones(4) + 0.1, "bn.running_mean": torch.ones(4), "bn.num_batches_tracked": torch.tensor(9)}
    sw = build_switch(pre, fin, "bn", 0.5)
    assert sw.buffers_differing == ["bn.num_batches_tracked", "bn.running_mean"]
    assert [e.name for e in sw.entries] == ["bn.weight"]


def test_build_rejects_mismatch_naming_the_tensor(tower):
    fin = dict(tower)
    name = next(k for k, v in tower.items() if v.dim() == 2)
    fin[name] = torch.zeros(3, 3)
    with pytest.raises(Incompatible, match=name.replace(".", r"\.")):
        build_switch(tower, fin, "t", 0.5)
    fin = dict(tower)
    del fin[name]
    with pytest.raises(Incompatible, match="lacks tensor"):
        build_switch(tower, fin, "t", 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_build_rejects_bad_alpha(tower, alpha):
    with pytest.raises(InvalidInput, match="alpha"):
        build_switch(tower, tower, "t", alpha)


def test_non_finite_checkpoints_are_refused():
    from switchbank.errors import CheckpointError
    pre = {"w": torch.zeros(4, 4)}
    for bad in (float("inf"), float("nan")):
        fin = {"w": torch.zeros(4, 4)}
        fin["w"][1, 2] = bad
        with pytest.raises(CheckpointError, match="'w'"):
            build_switch(pre, fin, "bad", 0.5)

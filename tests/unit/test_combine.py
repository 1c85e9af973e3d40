import pytest
import torch

from switchbank.baselines import METHODS
from switchbank.combine import dense_task_vector, merged_params, owned_bytes
from tests.helpers import make_switch


@pytest.fixture(scope="module")
def switches(tower):
    return [make_switch(tower, f"t{i}", seed=i, alpha=0.5 + 0.1 * i) for i in range(3)]


@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 0.0, 2.0]])
def test_materialisation_matches_dense_formula(tower, switches, weights):
    params = {k: v for k, v in tower.items() if v.is_floating_point()}
    before = {k: v.clone() for k, v in params.items()}
    weighted = list(zip(switches, weights))
    merged = merged_params(params, weighted)
    for name, theta0 in params.items():
        expected = theta0.clone()
        for sw, w in weighted:
            expected += w * dense_task_vector(sw, params)[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    for k in params:  # the base is never touched
        assert torch.equal(params[k], before[k])


def test_untouched_tensors_are_shared_not_copied(tower, switches):
    params = {k: v for k, v in tower.items() if v.is_floating_point()}
    params["extra.untouched"] = torch.ones(1000)
    merged = merged_params(params, [(switches[0], 1.0)])
    assert merged["extra.untouched"] is params["extra.untouched"]
    assert owned_bytes(merged, params) == sum(v.numel() * 4 for k, v in merged.items() if k != "extra.untouched")


def test_baselines_run_and_differ(tower, switches):
    base = {k: v for k, v in tower.items() if v.is_floating_point() and v.dim() > 0}
    tvs = {sw.name: dense_task_vector(sw, base) for sw in switches}
    seen = []
    for name, method in METHODS.items():
        per_task = method(base, tvs)
        assert set(per_task) == set(tvs)
        for params in per_task.values():
            assert params.keys() == base.keys()
            assert all(torch.isfinite(p).all() for p in params.values())
        seen.append(torch.cat([p.reshape(-1) for p in per_task["t0"].values()]))
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not torch.equal(seen[i], seen[j])


def test_task_arithmetic_formula(tower, switches):
    base = {k: v for k, v in tower.items() if v.is_floating_point() and v.dim() > 0}
    tvs = {sw.name: dense_task_vector(sw, base) for sw in switches}
    merged = METHODS["task_arithmetic"](base, tvs)["t1"]
    name = next(iter(base))
    torch.testing.assert_close(merged[name], base[name] + 0.3 * sum(tv[name] for tv in tvs.values()))

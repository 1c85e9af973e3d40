"""Just-in-time merges give bitwise the merged tensors, whatever the segments and the budget."""

import pytest
import torch

from switchbank.combine import merged_params
from switchbank.jit import JitMerge
from tests.unit.test_fused import base, switches  # noqa: F401  (fixtures)

ORDER = [("a", None), ("b", "c"), ("d",), ("e",), ("f", "s")]


@pytest.mark.parametrize("segment_bytes,budget", [(1, 1 << 30), (1 << 30, 1 << 30), (64, 1)])
@pytest.mark.parametrize("fused", [True, False])
def test_every_group_gets_its_merge(base, switches, segment_bytes, budget, fused):  # noqa: F811
    jit = JitMerge(base, ORDER, budget=budget, segment_bytes=segment_bytes)
    jit.fused = jit.fused and fused
    groups = [[(switches[0], 1.0)], [(switches[1], 0.3), (switches[3], 0.7)], [(switches[2], 2.0)]]
    expected = [merged_params(base, g, kernel=False) for g in groups]
    for _ in range(2):  # the scratch is reused by the next batch
        jit.begin(groups)
        for names in ORDER:
            got = [jit.get(g, names) for g in range(len(groups))]  # all groups before use, as an op does
            for g, ts in enumerate(got):
                for n, t in zip(names, ts):
                    if n is None:
                        assert t is None
                        continue
                    assert torch.equal(t.view(torch.int32), expected[g][n].view(torch.int32)), (g, n)
                    assert (t is base[n]) == (expected[g][n] is base[n])
        jit.end()
    segments = len(jit.segments)
    assert jit.merges <= 2 * len(groups) * segments


def test_a_switch_no_longer_served_is_not_kept_alive_and_a_new_one_is_merged_afresh(base):  # noqa: F811
    """What a switch adds to each segment is kept between merges, but not the switch itself: once
    the bank lets it go (evicted from memory, replaced), its bits are freed, and a switch made later
    (even at the same address) is merged from its own bits."""
    import gc
    import weakref

    from switchbank.build import build_switch
    from tests.unit.test_fused import tensors

    jit = JitMerge(base, ORDER, segment_bytes=64)
    gone = []
    for i in range(3):
        sw = build_switch(base, {k: v + 1e-2 * t for (k, v), t in zip(base.items(), tensors(10 + i).values())},
                          f"t{i}", 0.6)
        groups = [[(sw, 0.8)]]
        expected = merged_params(base, groups[0], kernel=False)
        jit.begin(groups)
        for names in ORDER:
            for n, t in zip(names, jit.get(0, names)):
                if n is not None:
                    assert torch.equal(t.view(torch.int32), expected[n].view(torch.int32)), (i, n)
        jit.end()
        gone.append(weakref.ref(sw))
        del sw, groups
        gc.collect()
    assert all(ref() is None for ref in gone)

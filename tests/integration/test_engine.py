import threading

import pytest
import torch

from switchbank.combine import merged_params
from switchbank.engine import Engine, Route, head_probs
from switchbank.errors import Incompatible, InvalidInput, NotFound
from tests.helpers import make_switch

TASKS = ["red", "green", "blue"]


def images(task: str, n: int, seed: int) -> torch.Tensor:
    """Images whose pixels centre on a per-task colour: distinct distributions for the router."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.zeros(3, 1, 1)
    colour[TASKS.index(task)] = 2.0
    return colour + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def engine(backbone, tower):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20)
    for i, t in enumerate(TASKS):
        q = backbone.forward(images(t, 8, seed=i))
        eng.add(make_switch(tower, t, seed=10 + i, dim=backbone.embed_dim, queries=q, router_fp=backbone.fingerprint))
    return eng


def test_backbone_fingerprint_matches_checkpoint(backbone, tower):
    from switchbank.checkpoints import fingerprint
    assert backbone.fingerprint == fingerprint(tower)


def test_named_task_uses_that_switch(engine, backbone):
    x = images("red", 2, seed=100)
    res = engine.run(x, [Route(task="green")] * 2)
    sw = engine.switches["green"]
    expected = head_probs(sw.head, backbone.forward(x, merged_params(backbone.params, [(sw, 1.0)])))
    assert all(r.head == "green" and r.mode == "task" and r.weights == {"green": 1.0} for r in res)
    torch.testing.assert_close(torch.stack([r.probs for r in res]), expected)


def test_auto_switch_routes_each_request_on_its_own(engine):
    x = torch.cat([images("red", 1, 200), images("blue", 1, 201), images("green", 1, 202)])
    res = engine.run(x, [Route()] * 3)
    assert [r.head for r in res] == ["red", "blue", "green"]
    assert all(r.mode == "auto" and r.weights == {r.head: 1.0} for r in res)


def test_explicit_weights(engine, backbone):
    x = images("red", 1, 300)
    res = engine.run(x, [Route(weights={"red": 0.25, "blue": 0.75})])[0]
    assert res.head == "blue" and res.weights == {"blue": 0.75, "red": 0.25}
    sws = engine.switches
    params = merged_params(backbone.params, [(sws["red"], 0.25), (sws["blue"], 0.75)])
    torch.testing.assert_close(res.probs, head_probs(sws["blue"].head, backbone.forward(x, params))[0])


def test_mixed_batch_equals_requests_alone(engine):
    x = torch.cat([images(t, 2, 400 + i) for i, t in enumerate(TASKS)])
    routes = [Route(task="red"), Route(), Route(weights={"green": 1, "red": 1}), Route(task="blue"), Route(), Route(task="red")]
    together = engine.run(x, routes)
    for i, r in enumerate(routes):
        alone = engine.run(x[i:i + 1], [r])[0]
        assert (alone.head, alone.weights) == (together[i].head, together[i].weights)
        torch.testing.assert_close(alone.probs, together[i].probs, rtol=1e-4, atol=1e-6)


def test_base_weights_never_change(engine, backbone):
    before = {k: v.clone() for k, v in backbone.params.items()}
    engine.run(images("red", 2, 500), [Route(task="red"), Route(weights={"blue": 2.0})])
    assert all(torch.equal(before[k], v) for k, v in backbone.params.items())


def test_cache_hits_and_invalidation_on_replace(engine, backbone, tower):
    x = images("green", 1, 600)
    engine.run(x, [Route(task="green")])
    hits = engine.cache.stats().hits
    first = engine.run(x, [Route(task="green")])[0]
    assert engine.cache.stats().hits == hits + 1
    old = engine.switches["green"]
    new = make_switch(tower, "green", seed=99, dim=backbone.embed_dim, queries=old.queries, router_fp=backbone.fingerprint)
    engine.add(new)
    assert not any("green" in k.names and k.hashes()["green"] == old.content_hash for k in engine.cache.keys())
    second = engine.run(x, [Route(task="green")])[0]
    assert not torch.allclose(first.probs, second.probs)
    engine.add(old)


def test_errors(engine, backbone, tower):
    x = images("red", 1, 700)
    with pytest.raises(NotFound):
        engine.run(x, [Route(task="nope")])
    with pytest.raises(NotFound):
        engine.run(x, [Route(weights={"nope": 1.0})])
    with pytest.raises(InvalidInput):
        engine.run(x, [Route(weights={"red": 0.0})])
    with pytest.raises(InvalidInput):
        engine.run(x, [Route(weights={"red": -1.0})])
    with pytest.raises(InvalidInput):
        engine.run(x, [Route(weights={"red": float("nan")})])
    foreign = make_switch({k: v + 1 for k, v in tower.items()}, "foreign", seed=1, dim=backbone.embed_dim)
    with pytest.raises(Incompatible, match="built for backbone"):
        engine.add(foreign)


def test_a_layout_checked_once_still_rejects_any_other(engine, backbone, tower):
    """The backbone check runs once per tensor layout; a switch that differs from a checked one in
    a single shape or name is still checked, and rejected."""
    good = make_switch(tower, "layout-good", seed=2, dim=backbone.embed_dim)
    engine.validate(good)
    engine.validate(good)  # the checked layout again
    e = good.entries[0]
    for wrong in (e._replace(shape=(1,) + e.shape), e._replace(name=e.name + ".x")):
        bad = make_switch(tower, "layout-bad", seed=2, dim=backbone.embed_dim)
        bad.entries = [wrong] + bad.entries[1:]
        with pytest.raises(Incompatible, match="layout-bad"):
            engine.validate(bad)


def test_replica_runs_merged_weights_and_shares_the_rest(engine, backbone):
    import gc
    import weakref
    params = merged_params(backbone.params, [(engine.switches["red"], 1.0)])
    module = backbone.replica(params)
    x = images("red", 3, 800)
    torch.testing.assert_close(backbone.forward(x, module), backbone.forward(x, params))
    for name, p in module.named_parameters():
        if params[name] is backbone.params[name]:
            assert p is backbone.params[name]  # untouched tensors are shared, not copied
        else:
            assert p.data_ptr() == params[name].data_ptr() and p is not backbone.params[name]
    merged = weakref.ref(next(t for n, t in params.items() if t is not backbone.params[n]))
    del module, params, p
    gc.collect()
    assert merged() is None  # dropping the replica returns the merged memory


def test_an_engine_built_cold_warms_up_on_its_first_batch(engine, backbone, tower):
    """Engine(warm=False) leaves the mixed tower and the kernels for later (a server does that after
    it reports ready); a batch that comes first waits for them and gets the same answers."""
    cold = Engine(backbone, k=5, cache_bytes=64 << 20, warm=False)
    assert cold.mixed is None and not cold.stats().warm and not cold.stats().mixed_forward
    for t in TASKS:
        cold.add(engine.switches[t])
    x = torch.cat([images(t, 2, seed=200 + i) for i, t in enumerate(TASKS)])
    routes = [Route(task="red"), Route(weights={"green": 0.5, "blue": 0.5}), Route()] * 2
    got, want = cold.run(x, routes), engine.run(x, routes)
    assert cold.stats().warm and cold.stats().mixed_forward and cold.mixed is not None
    assert [(r.head, r.weights, r.mode) for r in got] == [(r.head, r.weights, r.mode) for r in want]
    torch.testing.assert_close(torch.stack([r.probs for r in got]), torch.stack([r.probs for r in want]))


def test_towers_are_built_on_a_thread_apart_and_answer_as_before(backbone, tower):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, hot_after=1, hot_mix_after=1)
    for i, t in enumerate(TASKS):
        eng.add(make_switch(tower, t, seed=10 + i, dim=backbone.embed_dim, router_fp=backbone.fingerprint))
    threads, build = [], eng._materialise

    def recorded(combo, switches):
        threads.append(threading.current_thread())
        return build(combo, switches)

    eng._materialise = recorded
    x = images("red", 2, seed=700)
    routes = [Route(weights={"red": 0.25, "green": 0.75}), Route(task="blue")]
    first = eng.run(x, routes)
    assert len(threads) == 2 and all(t is not threading.current_thread() for t in threads)
    again = eng.run(x, routes)  # on the cached towers
    assert len(threads) == 2
    sws = eng.switches
    params = merged_params(backbone.params, [(sws["red"], 0.25), (sws["green"], 0.75)])
    torch.testing.assert_close(first[0].probs, head_probs(sws["green"].head, backbone.forward(x[:1], params))[0])
    for a, b in zip(first, again):
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)

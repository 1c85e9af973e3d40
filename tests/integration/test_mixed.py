"""The one-pass mixed forward: every row equals the same request served alone on its merged weights."""

import logging

import pytest
import torch
from torch import nn

from switchbank import mixed
from switchbank.backbone import DEMO_ARCH, load_backbone
from switchbank.bank import Bank
from switchbank.combine import merged_params
from switchbank.engine import Engine, Route, head_logits
from switchbank.jit import JitMerge
from tests.helpers import ROOT_DEMO_BANK, make_switch

TASKS = ["red", "green", "blue", "cyan", "grey"]


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference at most ``rel`` of the reference's range (the issue's exactness bar)."""
    span = float(want.max() - want.min())
    diff = float((got.float() - want.float()).abs().max())
    assert diff <= rel * span, f"max abs difference {diff:.3g} exceeds {rel:g} of the range {span:.3g}"


def images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def perturbed(params: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g).to(v.device, v.dtype)
            for k, v in params.items()}


def check_tower(backbone, groups_of: list[int], variants: list[dict]) -> None:
    """The mixed forward with one variant per group against each group run on its own."""
    tower, why = mixed.build(backbone.model, backbone.params, backbone.buffers, backbone.probe())
    assert tower is not None, why
    spans, start = [], 0
    for n in groups_of:
        spans.append((start, start + n))
        start += n
    x = images(start, backbone.probe().shape[-1], seed=1)
    groups = mixed.Groups(spans, lambda g, names: tuple(variants[g][n] if n else None for n in names))
    got = backbone.forward_mixed(x, tower, groups)
    for g, (s, e) in enumerate(spans):
        close(got[s:e], backbone.forward(x[s:e], variants[g]))


@pytest.mark.parametrize("arch", ["switchbank-tiny-vit", DEMO_ARCH])
def test_mixed_forward_equals_groups_alone(arch):
    b = load_backbone(arch, device="cpu")
    check_tower(b, [1, 3, 2, 1], [perturbed(b.params, s) for s in range(4)])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP", "EVA02-B-16", "convnext_base",
                                  "RN50", "ViTamin-S"])
def test_mixed_forward_equals_groups_alone_on_open_clip_towers(arch):
    b = load_backbone(arch, device="cpu")
    check_tower(b, [1, 2], [b.params, perturbed(b.params, 7)])


@pytest.mark.parametrize(("kind", "config"), [
    ("vit", {"global_pool": "map", "class_token": False}),  # SigLIP's layout: attention pooling on a latent query
    ("vit", {"global_pool": "token", "class_token": True, "reg_tokens": 2}),
    ("vit", {"global_pool": "avg", "class_token": True, "no_embed_class": True, "init_values": 0.1}),  # layer scale
    ("eva", {"use_rot_pos_emb": True, "swiglu_mlp": True, "qkv_fused": False}),  # EVA02: rotary embeddings, SwiGLU
    ("convnext", {"ls_init_value": 0.5}),  # layer scale read as gamma.reshape(1, -1, 1, 1), LayerNorm2d
    ("convnext", {"ls_init_value": 0.5, "conv_mlp": True}),
])
def test_timm_towers_run_in_one_pass(kind, config):
    """timm's VisionTransformer, EVA and ConvNeXt (open_clip's SigLIP, EVA and ConvNeXt towers):
    tokens, the latent query, the positional embedding and ConvNeXt's layer scale are read per row."""
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from torch.func import functional_call
    torch.manual_seed(0)
    if kind == "convnext":
        model = ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 16, 32), num_classes=0, **config).eval()
    else:
        cls = VisionTransformer if kind == "vit" else Eva
        model = cls(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0, **config).eval()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    tower, why = mixed.build(model, params, buffers, torch.randn(1, 3, 32, 32))
    assert tower is not None, why
    variants = [params, perturbed(params, 1, scale=0.2), perturbed(params, 2, scale=0.2)]
    spans = [(0, 2), (2, 3), (3, 5)]
    x = images(5, 32, seed=4)
    got = tower(x, mixed.Groups(spans, lambda g, n: tuple(variants[g][k] if k else None for k in n)))
    with torch.inference_mode():
        for g, (s, e) in enumerate(spans):
            want = functional_call(model, (variants[g], buffers), (x[s:e],), tie_weights=False, strict=False)
            close(got[s:e], want)
            if g:  # the variants differ enough for a wrong row to show
                assert not torch.allclose(want, functional_call(model, (params, buffers), (x[s:e],)), atol=1e-3)
    check_copies(model, tower, variants, buffers, x)
    # cold groups, merged just in time with every operation in a segment of its own (the slot a
    # segment is merged into is overwritten by the group's next one)
    tower_dict = {**params, **buffers}
    sws = [make_switch(tower_dict, f"s{i}", seed=30 + i, alpha=0.5) for i in range(3)]
    weighted = [[(sws[0], 1.0)], [(sws[1], 0.4), (sws[2], 0.6)], [(sws[0], 0.5), (sws[2], 2.0)]]
    jit = JitMerge(params, tower.merge_order(), segment_bytes=1)
    for layout, groups in ((spans, weighted), ([(0, 5)], weighted[1:2])):  # several groups, and one alone
        jit.begin(groups)
        got = tower(x, mixed.Groups(layout, jit.get))
        jit.end()
        with torch.inference_mode():
            for g, (s, e) in enumerate(layout):
                merged = merged_params(params, groups[g])
                close(got[s:e], functional_call(model, (merged, buffers), (x[s:e],), tie_weights=False, strict=False))


def test_same_padding_runs_as_a_grown_kernel_without_a_padded_copy(monkeypatch):
    """TensorFlow's "same" padding (timm's Conv2dSame) on inputs of even and odd sizes, for cached
    groups (weights folded and reordered once) and groups whose weights come per batch; a dilated
    kernel still takes a padded copy."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from torch.func import functional_call

    from switchbank import mixed_ops
    torch.manual_seed(0)
    model = nn.Sequential(
        create_conv2d(3, 8, 3, stride=2, padding="same"), BatchNormAct2d(8),
        create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True), BatchNormAct2d(8, act_layer=nn.ReLU6),
        create_conv2d(8, 8, 3, stride=2, dilation=2, padding="same"), BatchNormAct2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert sum(type(m).__name__ == "Conv2dSame" for m in model.modules()) == 3
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    probe = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    tower, why = mixed.build(model, params, buffers, probe)
    assert tower is not None, why
    copies, pad_same = [], mixed_ops.pad_same
    monkeypatch.setattr(mixed_ops, "pad_same", lambda x, *a, **k: copies.append(x.shape) or pad_same(x, *a, **k))
    variants = [perturbed(params, i, scale=0.2) for i in range(3)]
    memos = [tower.derived(v)[0] for v in variants]
    spans = [(0, 2), (2, 3), (3, 5)]
    for size in (16, 17, 20):
        x = images(5, size, seed=size).contiguous(memory_format=torch.channels_last)
        for cached in (False, True):
            copies.clear()
            groups = mixed.Groups(spans, lambda g, n: tuple(variants[g][k] if k else None for k in n),
                                  memo=[memos[g] if cached else {} for g in range(3)])
            got = tower(x, groups)
            dilated_in = -(-size // 4)  # the dilated convolution's input: the only one copied
            assert copies and all(tuple(c[1:]) == (8, dilated_in, dilated_in) for c in copies)
            with torch.inference_mode():
                for g, (s, e) in enumerate(spans):
                    close(got[s:e], functional_call(model, (variants[g], buffers), (x[s:e],)))


def test_bfloat16_tower():
    b = load_backbone("switchbank-tiny-vit", device="cpu", dtype="bfloat16")
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    variants = [b.params, perturbed(b.params, 3)]
    x = images(3, 32, seed=2)
    got = b.forward_mixed(x, tower, mixed.Groups([(0, 1), (1, 3)], lambda g, n: tuple(variants[g][k] if k else None for k in n)))
    close(got[1:], b.forward(x[1:], variants[1]), rel=2e-2)


@pytest.mark.parametrize("arch", ["switchbank-tiny-vit", DEMO_ARCH])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_towers_run_one_pass_as_accurately_as_alone(arch, dtype):
    """At fp16 and bf16 the one-pass forward (convolutions' norms folded at that precision) is as
    far from the fp32 answer as each group run alone at that precision is, within a factor of 3."""
    worst_mixed, worst_alone = half_precision_errors(arch, dtype, "cpu")
    assert worst_mixed <= 3 * worst_alone, (worst_mixed, worst_alone)


def half_precision_errors(arch: str, dtype: str, device: str) -> tuple[float, float]:
    """The largest error, relative to the fp32 answer's range, of the one-pass forward at ``dtype``
    and of each group run alone at ``dtype``."""
    wide = load_backbone(arch, device=device)
    b = load_backbone(arch, device=device, dtype=dtype)
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    spans = [(0, 1), (1, 3), (3, 5)]
    wide_variants = [wide.params, perturbed(wide.params, 3), perturbed(wide.params, 5)]
    variants = [{k: t.to(b.dtype) for k, t in v.items()} for v in wide_variants]
    x = images(5, b.probe().shape[-1], seed=2)
    with torch.inference_mode():
        groups = mixed.Groups(spans, lambda g, n: tuple(variants[g][k] if k else None for k in n), b.device)
        got = b.forward_mixed(x, tower, groups)
        worst_alone = worst_mixed = 0.0
        for g, (s, e) in enumerate(spans):
            want = wide.forward(x[s:e], wide_variants[g]).float()
            span = float(want.max() - want.min())
            alone = b.forward(x[s:e], variants[g]).float()
            worst_alone = max(worst_alone, float((alone - want).abs().max()) / span)
            worst_mixed = max(worst_mixed, float((got[s:e].float() - want).abs().max()) / span)
    return worst_mixed, worst_alone


def test_unsupported_module_is_refused_with_its_parameters():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.table = nn.Embedding(4, 8)  # no mixed operation reads an embedding table

        def forward(self, x):
            return self.proj(x) + self.table.weight[0]

    m = Odd().eval()
    tower, why = mixed.build(m, dict(m.named_parameters()), {}, torch.randn(1, 8))
    assert tower is None and "table.weight" in why


# --- through the engine, with real switches ---------------------------------------------------
def routes_for(names: list[str]) -> list[Route]:
    a, b, c, d, e = names[:5]
    return [
        Route(task=a), Route(), Route(weights={b: 0.3, c: 0.7}),
        Route(weights={a: 0.2, b: 0.2, c: 0.2, d: 0.2, e: 0.2}),  # five switches, sum 1
        Route(weights={d: 2.0}), Route(weights={a: 0.1, e: 0.3}),  # sums other than 1
        Route(task=c), Route(), Route(weights={b: 0.3, c: 0.7}), Route(task=a), Route(),
    ]


def check_engine(eng: Engine, x: torch.Tensor, routes: list[Route], rel: float = 1e-4) -> None:
    b, sws = eng.backbone, eng.switches
    for _ in range(3):  # cold, then hot as the HotSet admits combinations
        together = eng.run(x, routes)
        for i, r in enumerate(together):
            params = merged_params(b.params, [(sws[n], w) for n, w in r.weights.items()])
            alone = head_logits(sws[r.head].head, b.forward(x[i:i + 1], params))[0]
            close(r.logits, alone, rel)


def check_copies(model, tower, variants: list[dict], buffers: dict, x: torch.Tensor) -> None:
    """Requests run as copies (mixed_ops.Copies): one over all three groups (0.3, 0.5, 0.2), one
    over variants 1 and 2 (0.4, 0.3) with variant 0, the base weights, taking the remaining 0.3 as
    the engine's base group does, beside two run whole; each against the model on its merged
    weights."""
    from torch.func import functional_call
    assert tower.decomposable
    mixes = [{0: 1.0}, {0: 0.3, 1: 0.5, 2: 0.2}, {1: 0.4, 2: 0.3, 0: 0.3}, {2: 1.0}]
    rows, copies = {0: [], 1: [], 2: []}, []
    for r, mix in enumerate(mixes):
        for g, w in mix.items():
            rows[g].append((r, w))
    order, spans = [], []
    for g in range(3):
        spans.append((len(order), len(order) + len(rows[g])))
        for r, w in rows[g]:
            if len(mixes[r]) > 1:
                copies.append((len(order), r, w))
            order.append(r)
    groups = mixed.Groups(spans, lambda g, n: tuple(variants[g][k] if k else None for k in n),
                          copies=mixed.Copies.of(copies, x.device))
    got = tower(x[order], groups)
    with torch.inference_mode():
        for r, mix in enumerate(mixes):
            merged = {k: sum(w * variants[g][k] for g, w in mix.items()) for k in variants[0]}
            want = functional_call(model, (merged, buffers), (x[r:r + 1],), tie_weights=False, strict=False)
            for pos in [p for p, i in enumerate(order) if i == r]:
                close(got[pos:pos + 1], want)


@pytest.fixture(scope="module")
def tiny_switches(backbone, tower):
    out = []
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(i)
        q = backbone.forward(images(6, 32, seed=50 + i) + torch.randn(3, 1, 1, generator=g))
        out.append(make_switch(tower, t, seed=20 + i, dim=backbone.embed_dim, queries=q, router_fp=backbone.fingerprint))
    return out


@pytest.mark.parametrize("hot_after,hot_mix_after", [(0, 0), (1, 1), (2, 2), (2, 8)])
def test_tiny_vit_rows_equal_requests_alone(backbone, tiny_switches, hot_after, hot_mix_after):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, hot_after=hot_after, hot_mix_after=hot_mix_after)
    for sw in tiny_switches:
        eng.add(sw)
    routes = routes_for(TASKS)
    check_engine(eng, images(len(routes), 32, seed=3), routes)
    s = eng.stats()
    assert s.mixed_forward and s.batches_mixed == 3
    # a ViT runs a mix without cached weights as copies over its switches
    assert (s.copies > 0) == (hot_mix_after != 1)
    sizes = [len(c.terms) for c in eng.cache.keys()]
    if hot_after == 0:
        assert sizes == [] and s.groups_cold > 0
    elif hot_mix_after > 3:  # three batches: the switches alone are cached, no mix is
        assert sizes and max(sizes) == 1
    else:
        assert max(sizes) > 1


def test_scratch_smaller_than_a_group_still_exact(backbone, tiny_switches):
    eng = Engine(backbone, k=5, hot_after=0, hot_mix_after=0, scratch_bytes=1)  # every group shares one slot
    for sw in tiny_switches:
        eng.add(sw)
    routes = routes_for(TASKS)
    check_engine(eng, images(len(routes), 32, seed=4), routes)


@pytest.fixture(scope="module")
def demo_engine():
    b = load_backbone(DEMO_ARCH, device="cpu")
    eng = Engine(b, k=10, cache_bytes=256 << 20, router_metric="cosine")
    for sw in Bank(ROOT_DEMO_BANK).load_all()[1].values():
        eng.add(sw)
    return eng


def test_demo_tower_cold_groups_are_exact_with_every_operation_in_a_segment_of_its_own(demo_engine):
    """A folded convolution reads its norm's tensors too: the just-in-time merge keeps both in one
    segment, or merging the norm's would overwrite the convolution's merged weight."""
    from demo.tasks import LOADERS, load
    b = demo_engine.backbone
    eng = Engine(b, k=10, cache_bytes=256 << 20, router_metric="cosine", hot_after=0, hot_mix_after=0)
    for sw in demo_engine.switches.values():
        eng.add(sw)
    eng.jit = JitMerge(b.params, eng.mixed.merge_order(), segment_bytes=1)
    assert len(eng.jit.segments) > 40
    x = torch.stack([b.preprocess(load(name).test[i]) for i in range(2) for name in LOADERS][:11])
    check_engine(eng, x, routes_for(sorted(eng.switches)))
    assert eng.stats().groups_hot == 0


def test_demo_tower_rows_equal_requests_alone(demo_engine):
    from demo.tasks import LOADERS, load
    b = demo_engine.backbone
    x = torch.stack([b.preprocess(load(name).test[i]) for i in range(2) for name in LOADERS][:11])
    check_engine(demo_engine, x, routes_for(sorted(demo_engine.switches)))
    s = demo_engine.stats()
    # its norms are folded into its convolutions, so a mix gets merged weights rather than copies
    assert s.mixed_forward and not demo_engine.mixed.decomposable and s.copies == 0


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "rel"), [("float16", 2e-2), ("bfloat16", 0.15)])
def test_demo_tower_at_half_precision_serves_mixed_batches_in_one_pass(dtype, rel):
    """Named, weighted and Auto-Switch rows at fp16 and bf16, each within that precision's rounding
    of the same request alone (measured: 0.5% of the logits' range at fp16, 7% at bf16)."""
    from demo.tasks import LOADERS, load
    b = load_backbone(DEMO_ARCH, device="cpu", dtype=dtype)
    eng = Engine(b, k=10, cache_bytes=256 << 20, router_metric="cosine")
    for sw in Bank(ROOT_DEMO_BANK).load_all()[1].values():
        eng.add(sw)
    x = torch.stack([b.preprocess(load(name).test[i]) for i in range(2) for name in LOADERS][:11])
    check_engine(eng, x, routes_for(sorted(eng.switches)), rel)
    s = eng.stats()
    assert s.mixed_forward and s.batches_mixed == 3 and s.batches_grouped == 0


@pytest.mark.parametrize("copies", [True, False])
def test_a_mix_that_is_not_hot_takes_no_cache_entry(backbone, tiny_switches, copies):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, hot_after=2, hot_mix_after=3)
    assert eng.mixed.decomposable
    eng.mixed.decomposable = copies  # off: as a tower with folded norms runs a mix (its own weights)
    for sw in tiny_switches:
        eng.add(sw)
    x = images(2, 32, seed=5)
    once = [Route(weights={"red": 0.5, "blue": 0.5}), Route(task="green")]

    def cached():
        return sorted(c.names for c in eng.cache.keys())

    eng.run(x, once)
    s = eng.stats()
    # the mix runs as copies in the groups of red and blue, or on weights merged for it alone
    assert cached() == [] and (s.groups_cold, s.copies) == ((3, 2) if copies else (2, 0))
    eng.run(x, once)  # seen in two batches: the switches are cached (red and blue through the mix)
    assert cached() == ([("blue",), ("green",), ("red",)] if copies else [("green",)])
    eng.run(x, once)  # the mix, in its third batch, is cached too
    assert ("blue", "red") in cached()
    before = cached()
    eng.run(x[:1], [Route(weights={"red": 0.25, "blue": 0.75})])  # a new mix stays out of the cache
    assert cached() == before


def test_unsupported_tower_falls_back_to_one_forward_per_group(backbone, tiny_switches, monkeypatch, caplog):
    monkeypatch.setattr(mixed, "build", lambda *a, **k: (None, "a module it does not know"))
    with caplog.at_level(logging.WARNING, logger="switchbank.engine"):
        eng = Engine(backbone, k=5, cache_bytes=64 << 20)
    assert "one-pass mixed forward unavailable" in caplog.text and "a module it does not know" in caplog.text
    for sw in tiny_switches:
        eng.add(sw)
    routes = routes_for(TASKS)
    check_engine(eng, images(len(routes), 32, seed=6), routes)
    s = eng.stats()
    assert not s.mixed_forward and s.mixed_unsupported == "a module it does not know" and s.batches_grouped == 3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12), (2, 4, 4, 12)])
def test_linear_answers_as_f_linear_with_or_without_onednn(monkeypatch, shape, bias):
    from switchbank import onednn
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(9, 12, generator=g)
    b = torch.randn(9, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    got = onednn.linear(x, w, b)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert torch.equal(onednn.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()),
                       torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()))
    monkeypatch.setattr(onednn, "LINEAR", None)
    assert torch.equal(onednn.linear(x, w, b), want)


def test_onednn_linear_is_found_on_builds_with_onednn():
    from switchbank import onednn
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert onednn.LINEAR is not None


def test_demo_tower_runs_its_activations_inside_the_convolutions():
    """Where oneDNN is there, ReLU6 after a folded BatchNorm runs as the convolution's post-op; the
    answers stay those of each group alone, and those of the tower with the activation apart."""
    from switchbank import onednn
    b = load_backbone(DEMO_ARCH, device="cpu")
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    fused = [c for c, _ in tower.pairs if c.act is not None]
    if onednn.CONV is None or onednn.LINEAR is None:
        pytest.skip("this torch build has no oneDNN convolution with post-ops")
    assert fused and all(c.act == ("hardtanh", [0.0, 6.0]) for c in fused)
    assert any(c.pointwise for c in fused) and any(not c.pointwise for c in fused)
    variants = [perturbed(b.params, s) for s in range(3)]
    spans = [(0, 2), (2, 3), (3, 5)]
    x = images(5, b.probe().shape[-1], seed=2)

    def fetch(g, names):
        return tuple(variants[g][n] if n else None for n in names)

    on = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))
    tower.set_fused_act(False)
    off = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))
    close(on, off)
    for g, (s, e) in enumerate(spans):
        close(on[s:e], b.forward(x[s:e], variants[g]))


def test_cached_weights_are_reordered_for_onednn_and_answer_alike_on_every_path():
    """A cached tower's folded convolutions are kept in oneDNN's layout where oneDNN runs them;
    the answers equal those of torch-layout weights, also where a batch takes another path (an
    input that is not channels_last) and the reordered weights are turned back."""
    from switchbank import onednn
    b = load_backbone(DEMO_ARCH, device="cpu")
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    if onednn.PACK_CONV is None:
        pytest.skip("this torch build has no oneDNN weight reorders")
    variants = [perturbed(b.params, s) for s in range(2)]
    memos = [tower.derived(v)[0] for v in variants]
    kinds = {(c.pointwise, memos[0][id(c)][0].is_mkldnn) for c, _ in tower.pairs}
    assert kinds == {(True, True), (False, True)}  # pointwise and spatial, all reordered
    spans = [(0, 2), (2, 4)]
    x = images(4, b.probe().shape[-1], seed=3)

    def fetch(g, names):
        return tuple(variants[g][n] if n else None for n in names)

    packed = b.forward_mixed(x, tower, mixed.Groups(spans, fetch, memo=memos))
    plain = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))  # folded now, from the first forward's shapes
    close(packed, plain)
    for g, (s, e) in enumerate(spans):
        close(packed[s:e], b.forward(x[s:e], variants[g]))
    with torch.inference_mode():  # not channels_last: pointwise convolutions run as convolutions, on weights turned back
        nchw = tower(x.contiguous(), mixed.Groups(spans, fetch, memo=memos)).float()
    close(nchw, packed)


def test_demo_tower_keeps_the_groups_apart_between_its_convolutions(monkeypatch):
    """The demo tower hands per-group Parts from convolution to convolution, joined only before the
    pooling: the answers are those of the batch joined after every operation, to the bit, and those
    of each group alone."""
    from switchbank import parts
    b = load_backbone(DEMO_ARCH, device="cpu")
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    assert tower.parts
    variants = [perturbed(b.params, s) for s in range(4)]
    spans = [(0, 1), (1, 4), (4, 6), (6, 7)]
    x = images(7, b.probe().shape[-1], seed=3)

    def fetch(g, names):
        return tuple(variants[g][n] if n else None for n in names)

    joins = []
    real_join = parts.Parts.join
    monkeypatch.setattr(parts.Parts, "join", lambda self: joins.append(1) or real_join(self))
    apart = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))
    assert 1 <= len(joins) <= 2  # once, where the trunk pools (and at most once more, for the output)
    tower.set_parts(False)
    joined = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))
    assert torch.equal(apart, joined)
    for g, (s, e) in enumerate(spans):
        close(apart[s:e], b.forward(x[s:e], variants[g]))


@pytest.mark.parametrize("parts", [True, False])
@pytest.mark.parametrize("fused_act", [True, False])
def test_cold_groups_run_their_norm_on_the_output_where_it_is_smaller_than_the_weight(monkeypatch, parts, fused_act):
    """A convolution whose weight was merged for this batch has its norm folded into the weight,
    or, where the group's output is the smaller (the demo tower's last stages), run on the output:
    both answer as each group alone, with the groups kept apart or joined and the norm's
    activation inside the convolution or after it."""
    from switchbank import mixed_ops
    b = load_backbone(DEMO_ARCH, device="cpu")
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    tower.set_parts(parts)
    tower.set_fused_act(fused_act)
    variants = [perturbed(b.params, s) for s in range(3)]
    spans = [(0, 1), (1, 3), (3, 4)]
    x = images(4, b.probe().shape[-1], seed=5)

    def fetch(g, names):
        return tuple(variants[g][n] if n else None for n in names)

    finished, folded = [], []
    real_finish, real_fold = mixed_ops.MixedConv.finish, mixed_ops.fold
    monkeypatch.setattr(mixed_ops.MixedConv, "finish", lambda self, *a: finished.append(1) or real_finish(self, *a))
    monkeypatch.setattr(mixed_ops, "fold", lambda *a: folded.append(1) or real_fold(*a))
    outs = {}
    for unfold in (float("inf"), mixed_ops.UNFOLD, 0):
        monkeypatch.setattr(mixed_ops, "UNFOLD", unfold)
        finished.clear()
        folded.clear()
        outs[unfold] = b.forward_mixed(x, tower, mixed.Groups(spans, fetch))
        counts = len(finished), len(folded)
        if unfold == 0:
            assert counts[0] and not counts[1]
        elif unfold == float("inf"):
            assert counts[1] and not counts[0]
        else:
            assert all(counts)
    for out in outs.values():
        for g, (s, e) in enumerate(spans):
            close(out[s:e], b.forward(x[s:e], variants[g]))


def test_a_convolutions_output_size_is_known_before_it_runs():
    """The size the fold-or-not rule reads, for every padding a convolution may have."""
    from timm.layers.conv2d_same import Conv2dSame

    from switchbank.mixed_ops import MixedConv, _Active
    cases = [(nn.Conv2d(4, 6, k, stride=s, padding=p), False) for p in (0, 1, (2, 1), "valid") for k, s in
             ((3, 1), (3, 2), (5, 2), (1, 1))]
    cases += [(nn.Conv2d(4, 6, 3, padding="same"), False), (Conv2dSame(4, 6, 3, stride=2), True)]
    for mod, same in cases:
        conv = MixedConv(_Active({}), ("w", "b"), mod, same)
        for hw in ((7, 7), (8, 9), (16, 16)):
            assert conv.out_numel(hw) == mod(torch.randn(1, 4, *hw)).numel(), (mod, hw)


class _ConvThenMean(nn.Module):
    """Convolutions whose output a tensor method (not a module) reads: Parts cannot reach it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4).eval()
        self.pw = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.pw(self.bn(self.conv(x))).mean((2, 3))


def test_a_tower_that_needs_the_batch_whole_between_convolutions_keeps_it_joined():
    model = _ConvThenMean().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    probe = images(1, 8, seed=4)
    tower, why = mixed.build(model, params, buffers, probe)
    assert tower is not None, why
    assert not tower.parts
    variants = [perturbed({k: v.detach() for k, v in params.items()}, s) for s in range(3)]
    spans = [(0, 2), (2, 3), (3, 5)]
    x = images(5, 8, seed=5)
    got = tower(x, mixed.Groups(spans, lambda g, names: tuple(variants[g][n] if n else None for n in names)))
    for g, (s, e) in enumerate(spans):
        want = torch.func.functional_call(model, ({**variants[g]}, buffers), (x[s:e],))
        close(got[s:e], want)

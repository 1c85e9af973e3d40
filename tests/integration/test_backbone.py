import pytest
import torch
from PIL import Image

from switchbank.backbone import DEMO_ARCH, demo_weights, load_backbone
from switchbank.checkpoints import read_state_dict
from switchbank.errors import Incompatible, SwitchBankError
from tests.helpers import ARCH, finetune, save, visual


@pytest.fixture(scope="module")
def demo():
    return load_backbone(DEMO_ARCH, device="cpu")


def test_demo_backbone_is_the_packaged_imagenet_model(demo):
    assert len(demo.params) + len(demo.buffers) == 294  # 296 packaged tensors less the ImageNet classifier
    assert demo.embed_dim == 1280
    assert sum(p.numel() for p in demo.params.values()) == 3_371_008


@pytest.mark.parametrize("photo,size,expected", [
    ("china.jpg", None, {"palace", "bell cote, bell cot", "monastery"}),  # the demo's 128 px
    ("china.jpg", 224, {"palace", "bell cote, bell cot", "monastery"}),   # ImageNet's 224 px
    ("flower.jpg", 224, {"daisy"}),
])
def test_demo_backbone_recognises_real_photos(demo, photo, size, expected):
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    if size:
        demo = load_backbone(DEMO_ARCH, device="cpu", image_size=size)
    fc = read_state_dict(demo_weights())
    image = Image.fromarray(load_sample_image(photo))
    feats = demo.forward(demo.preprocess(image)[None])
    logits = feats @ fc["_fc.weight"].T + fc["_fc.bias"]
    top3 = {ImageNetInfo().index_to_description(i) for i in logits.topk(3).indices[0].tolist()}
    assert top3 & expected


def test_cpu_towers_take_channels_last_input_with_the_same_embeddings(demo):
    seen = []
    hook = demo.model.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(3, 3, 128, 128)
    try:
        feats = demo.forward(x)
    finally:
        hook.remove()
    assert seen == [True]
    with torch.inference_mode():
        nchw = demo.model(x)  # open_clip's own layout
    torch.testing.assert_close(feats, nchw, rtol=1e-4, atol=1e-5)


def test_user_checkpoint_loads_through_the_same_path(tmp_path, model_state):
    tuned = {f"visual.{k}": v for k, v in finetune(visual(model_state), seed=4).items()}
    path = save({**model_state, **tuned}, tmp_path / "user.safetensors")
    b = load_backbone(ARCH, path, device="cpu")
    k = "conv1.weight"
    assert torch.equal(b.params[k], tuned["visual." + k])
    tower_only = save(visual({**model_state, **tuned}), tmp_path / "tower.safetensors")
    assert load_backbone(ARCH, tower_only, device="cpu").fingerprint == b.fingerprint


def test_loader_errors(tmp_path, model_state):
    with pytest.raises(SwitchBankError, match="unknown model architecture"):
        load_backbone("no-such-arch")
    bad = dict(visual(model_state))
    bad.pop("conv1.weight")
    with pytest.raises(Incompatible, match="conv1.weight"):
        load_backbone(ARCH, save(bad, tmp_path / "bad.safetensors"), device="cpu")

import numpy as np
import pytest
import torch
from PIL import Image

from switchbank.preprocess import Preprocess


@pytest.fixture(scope="module")
def compose(backbone):
    return backbone.preprocess.compose


def test_numpy_tail_equals_torch_to_the_bit(backbone, compose):
    pre = backbone.preprocess
    assert pre.head is not None  # open_clip's transforms end in ToTensor and Normalize
    rng = np.random.default_rng(0)
    for mode in ("RGB", "RGBA", "L", "P"):
        for _ in range(10):
            h, w = (int(v) for v in rng.integers(1, 300, size=2))
            im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(mode)
            got, want = pre(im), compose(im)
            assert got.dtype == want.dtype == torch.float32 and got.is_contiguous()
            assert torch.equal(got, want), (mode, h, w)


def test_other_transforms_run_as_given():
    class Steps:
        def __init__(self):
            self.transforms = [lambda im: im]

        def __call__(self, im):
            return torch.tensor([1.0])

    pre = Preprocess(Steps())
    assert pre.head is None and torch.equal(pre(object()), torch.tensor([1.0]))

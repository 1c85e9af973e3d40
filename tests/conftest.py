from __future__ import annotations

import pytest
import torch

from switchbank.backbone import load_backbone
from tests.helpers import ARCH, pretrained_model_state, visual


@pytest.fixture(scope="session")
def model_state():
    return pretrained_model_state()


@pytest.fixture(scope="session")
def tower(model_state):
    return visual(model_state)


@pytest.fixture(scope="session")
def backbone():
    return load_backbone(ARCH, device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

import pickle

import pytest
import torch

from switchbank.checkpoints import fingerprint, image_tower, read_state_dict
from switchbank.errors import CheckpointError
from tests.helpers import save


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_reads_safetensors_and_torch_files(tmp_path, model_state):
    st = save(model_state, tmp_path / "m.safetensors")
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model_state.items()}}, pt)
    a, b = read_state_dict(st), read_state_dict(pt)
    assert a.keys() == b.keys() == model_state.keys()


def test_image_tower_handles_prefix(model_state):
    tower = image_tower(model_state)
    assert tower and all(not k.startswith("visual.") for k in tower)
    assert "conv1.weight" in tower and "token_embedding.weight" not in tower
    assert image_tower(tower) == tower  # already an image tower


def test_refuses_pickled_objects(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(p)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        read_state_dict(tmp_path / "list.pt")


def test_fingerprint_ignores_dtype_and_integer_buffers(model_state):
    tower = image_tower(model_state)
    half = {k: v.half().float() for k, v in tower.items()}
    assert fingerprint(half) == fingerprint({k: v.half().float() for k, v in tower.items()})
    changed = dict(tower)
    k = next(iter(changed))
    changed[k] = changed[k] + 1
    assert fingerprint(changed) != fingerprint(tower)
    assert fingerprint({**tower, "n": torch.tensor(5)}) == fingerprint(tower)

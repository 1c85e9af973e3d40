"""Heads of switches listed from a bank: left in their files, read when needed, kept under a budget."""

import pytest
import torch

from switchbank.bank import Bank
from switchbank.errors import SwitchChanged, Unavailable
from switchbank.format import to_bytes
from switchbank.heads import Heads
from tests.helpers import make_switch


@pytest.fixture()
def made(tower):
    return {n: make_switch(tower, n, seed=i, classes=3 + i) for i, n in enumerate("abcd")}


@pytest.fixture()
def light(tmp_path, made):
    bank = Bank(tmp_path / "bank", create=True)
    bank.add_many([to_bytes(sw) for sw in made.values()])
    return {n: bank.load(n, light=True) for n in "abcd"}


def same_head(got, want):
    assert got.classes == want.classes and got.normalize == want.normalize
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


def test_a_listed_head_holds_no_weights_and_is_read_once_when_needed(light, made):
    for n, sw in light.items():
        assert sw.head.listed and sw.head.weight is None and sw.head.bias is None
        assert sw.head.classes == made[n].head.classes and sw.head.dim == made[n].head.weight.shape[1]
    heads = Heads(1 << 20)
    first = heads.get(light["a"])
    same_head(first, made["a"].head)
    assert heads.get(light["a"]) is first and light["a"].head.listed  # the switch keeps its listing
    s = heads.stats()
    assert (s.heads, s.loads, s.head_bytes) == (1, 1, first.nbytes)
    assert heads.get(made["b"]) is made["b"].head  # a switch that holds its head is not read again
    assert heads.stats().loads == 1


def test_least_recently_used_heads_go_past_the_budget_and_pinned_ones_stay(light, made):
    sizes = {n: Heads(1 << 20).get(sw).nbytes for n, sw in light.items()}
    heads = Heads(sizes["a"] + sizes["c"])  # room for a and b, or a and c (c is larger than b)
    for n in "ab":
        heads.get(light[n])
    heads.get(light["a"])  # b is now the least recently used
    heads.get(light["c"])
    assert sorted(heads.per_switch()) == ["a", "c"]
    one = Heads(1)  # smaller than any head: only the one just read is held
    one.pin([light["d"]])
    for n in "abc":
        same_head(one.get(light[n]), made[n].head)
    assert sorted(one.per_switch()) == ["c", "d"] and one.stats().evictions == 2
    one.forget("c")
    assert sorted(one.per_switch()) == ["d"] and one.stats().head_bytes == sizes["d"]


def test_a_head_whose_bytes_moved_in_the_file_is_read_from_the_whole_file(light, made):
    """The same content written again with a longer header (its tensors further on): the listed
    byte ranges no longer hold the head, so it is taken from the whole file, checked by its hash."""
    path = light["a"].source
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes((n + 64).to_bytes(8, "little") + data[8:8 + n] + b" " * 64 + data[8 + n:])
    same_head(Heads(1 << 20).get(light["a"]), made["a"].head)


def test_a_head_changed_or_removed_after_listing_is_refused(light):
    path = light["b"].source
    weight_at = light["b"].head_at[0]
    data = bytearray(path.read_bytes())
    data[weight_at[0] + 1] ^= 0x40  # a bit flipped in the head's weights: still finite, but not the listed head
    path.write_bytes(bytes(data))
    heads = Heads(1 << 20)
    with pytest.raises(Unavailable, match="head of switch 'b'.*content hash mismatch") as err:
        heads.get(light["b"])
    assert not isinstance(err.value, SwitchChanged)
    light["c"].source.unlink()
    with pytest.raises(SwitchChanged, match="removed since it was listed"):
        heads.get(light["c"])
    assert heads.stats().heads == 0

import numpy as np
import pytest
import torch

from switchbank.packing import (compact_to_dense, dense_to_compact, encode_compact, pack_bits, packed_len,
                                rice_decode, rice_encode, ternary, unpack_bits)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4097])
def test_pack_unpack_round_trip(n):
    bits = torch.rand(n) < 0.3
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.size == packed_len(n)
    assert torch.equal(unpack_bits(packed, n), bits)


def test_bit_order_is_lsb_first():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [1, 2]


@pytest.mark.parametrize("n", [1, 13, 1024, 5001])
def test_compact_and_dense_forms_round_trip(n):
    mask = torch.rand(n) < 0.4
    positive = torch.rand(n) < 0.5
    m, s, kept = encode_compact(mask, positive)
    assert kept == int(mask.sum()) and s.size == packed_len(kept)
    pos = compact_to_dense(m, s, n, kept)
    assert torch.equal(unpack_bits(pos, n), mask & positive)
    assert np.array_equal(dense_to_compact(m, pos, n), s)
    tern = ternary(torch.from_numpy(m), torch.from_numpy(pos), n, torch.float32)
    expected = mask.float() * torch.where(positive, 1.0, -1.0)
    assert torch.equal(tern, expected)


def test_compact_rejects_wrong_kept_count():
    m, s, kept = encode_compact(torch.ones(16, dtype=torch.bool), torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="set bits"):
        compact_to_dense(m, s, 16, kept - 1)


@pytest.mark.parametrize("p", [0.0, 0.001, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 9, 4096, 100_003])
def test_rice_round_trip(p, n):
    mask = np.random.default_rng(0).random(n) < p
    stream, k, unary_bits = rice_encode(mask)
    assert np.array_equal(rice_decode(stream, n, int(mask.sum()), k, unary_bits), mask)


def test_rice_is_near_the_entropy_of_sparse_masks():
    p, n = 0.1, 200_000
    mask = np.random.default_rng(1).random(n) < p
    stream, _, _ = rice_encode(mask)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert 8 * stream.size / n <= 1.05 * entropy


def test_rice_decode_rejects_inconsistent_streams():
    mask = np.random.default_rng(2).random(1000) < 0.1
    stream, k, u = rice_encode(mask)
    with pytest.raises(ValueError):
        rice_decode(stream, 1000, int(mask.sum()) + 1, k, u)
    with pytest.raises(ValueError):
        rice_decode(stream[:-1], 1000, int(mask.sum()), k, u)


@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.49])
def test_fast_rice_decoder_equals_the_reference(density):
    from switchbank.packing import rice_decode, rice_encode, rice_len, rice_to_bitmap
    g = np.random.default_rng(int(density * 1000))
    mask = g.random(100_003) < density
    stream, k, ub = rice_encode(mask)
    assert np.array_equal(rice_to_bitmap(stream, mask.size, int(mask.sum()), k, ub),
                          pack_bits(rice_decode(stream, mask.size, int(mask.sum()), k, ub)))
    with pytest.raises(ValueError):
        rice_to_bitmap(stream, mask.size, int(mask.sum()) + 1, k, ub)  # claims one bit more
    with pytest.raises(ValueError):
        rice_to_bitmap(stream, 10, int(mask.sum()), k, ub)  # points past the end
    assert rice_len(int(mask.sum()), k, ub) == stream.size


def test_sign_expansion_equals_the_reference():
    from switchbank.packing import expand_signs
    g = np.random.default_rng(3)
    sizes = [1, 7, 8, 9, 1000, 4099]
    masks, signs, kept = [], [], []
    for n in sizes:
        m = g.random(n) < 0.4
        s = g.random(n) < 0.5
        masks.append(pack_bits(m))
        signs.append(pack_bits(s[m]))
        kept.append(int(m.sum()))
    pos = expand_signs(np.concatenate(masks), np.concatenate(signs), [len(m) for m in masks], kept)
    want = np.concatenate([compact_to_dense(m, s, n, k) for m, s, n, k in zip(masks, signs, sizes, kept)])
    assert np.array_equal(pos, want)
    with pytest.raises(ValueError, match="set bits"):
        expand_signs(np.concatenate(masks), np.concatenate(signs), [len(m) for m in masks], [k + 1 for k in kept])


def test_without_numba_the_decoders_give_the_same_bits(monkeypatch):
    """Where numba does not load, expanding signs and decoding Rice streams take the numpy path."""
    from switchbank import packing
    g = np.random.default_rng(4)
    m = g.random(5000) < 0.3
    mask, sign = pack_bits(m), pack_bits(g.random(int(m.sum())) < 0.5)
    stream, k, ub = packing.rice_encode(m)
    kept = int(m.sum())

    def decode():
        return packing.expand_signs(mask, sign, [mask.size], [kept]), packing.rice_to_bitmap(stream, m.size, kept, k, ub)

    fast = decode()
    monkeypatch.setattr(packing, "_KERNELS", False)
    assert packing._kernels() is None
    slow = decode()
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])

import json
import struct

import pytest
import torch
from safetensors.torch import save

from switchbank.errors import CorruptSwitch
from switchbank.format import describe, from_bytes, read_meta, to_bytes
from tests.helpers import make_switch


@pytest.fixture(scope="module")
def switch(tower):
    return make_switch(tower, "alpha-task", seed=3, center=torch.zeros(32), router_fp="sha256:r")


def test_round_trip_is_exact(switch):
    data = to_bytes(switch)
    back = from_bytes(data)
    assert back.content_hash == switch.content_hash
    assert back.entries == switch.entries
    assert torch.equal(back.mask, switch.mask) and torch.equal(back.pos, switch.pos)
    assert torch.equal(back.head.weight, switch.head.weight) and back.head.classes == switch.head.classes
    assert torch.equal(back.queries, switch.queries.half().float())  # stored as float16 since version 2
    assert back.dense.keys() == switch.dense.keys()
    assert to_bytes(back) == data  # deterministic bytes


def test_on_disk_bits_per_parameter(switch):
    info = describe(switch, len(to_bytes(switch)))
    assert info["bits_per_param"] <= (1 + (1 - switch.alpha)) * 1.02
    assert info["resident_bits_per_param"] <= 2.1


@pytest.mark.parametrize("alpha", [0.8, 0.9, 0.97])
def test_sparse_switches_round_trip_with_rice_coded_masks(tower, alpha):
    import math
    sw = make_switch(tower, "sparse", seed=4, alpha=alpha)
    data = to_bytes(sw)
    back = from_bytes(data)
    assert torch.equal(back.mask, sw.mask) and torch.equal(back.pos, sw.pos) and back.entries == sw.entries
    assert to_bytes(back) == data
    q = 1 - alpha
    bound = -(q * math.log2(q) + (1 - q) * math.log2(1 - q)) + q
    info = describe(back)
    assert info["bits_per_param"] <= 1.1 * bound + 0.05  # small tensors pay byte padding and scales
    assert any(len(row) == 5 for row in read_meta(data)["tensors"])  # some tensors are Rice coded


def test_truncated_file_is_rejected(switch):
    data = to_bytes(switch)
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptSwitch):
            from_bytes(data[:cut])


def test_flipped_bit_is_rejected(switch):
    data = bytearray(to_bytes(switch))
    data[-10] ^= 0x04
    with pytest.raises(CorruptSwitch, match="content hash"):
        from_bytes(bytes(data))


def test_tampered_metadata_is_rejected(switch):
    data = to_bytes(switch)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["switchbank"])
    meta["alpha"] = 0.1
    header["__metadata__"]["switchbank"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with pytest.raises(CorruptSwitch, match="content hash"):
        from_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_foreign_files_are_rejected():
    with pytest.raises(CorruptSwitch, match="not a switch file"):
        from_bytes(save({"w": torch.zeros(3)}))
    with pytest.raises(CorruptSwitch):
        from_bytes(b"\x80\x04\x95" + b"pickle payload" * 10)
    with pytest.raises(CorruptSwitch, match="version"):
        from_bytes(save({"w": torch.zeros(3)}, metadata={"switchbank": json.dumps({"format": "switchbank-switch", "version": 99})}))


def test_read_meta_does_not_decode_tensors(switch):
    meta = read_meta(to_bytes(switch))
    assert meta["name"] == "alpha-task" and meta["classes"] == switch.head.classes


def test_tensor_rows_checked_by_column_agree_with_the_row_by_row_checks():
    """layout._rows_ok (the fast path for big banks) accepts exactly the rows the row-by-row checks
    accept: any row they reject makes it answer False."""
    from switchbank.layout import MAX_NUMEL, _check_row, _rows_ok

    def row_by_row(rows) -> bool:
        names = set()
        try:
            for i, row in enumerate(rows):
                _check_row(i, row, names)
        except CorruptSwitch:
            return False
        return True

    good = [["a.weight", [4, 3], 5], ["a.bias", [4], 2, 1, 5], ["b.weight", [2, 2, 1, 1], 4], ["c", [7], 7, 0, 7]]
    assert _rows_ok(good) and row_by_row(good)
    assert _rows_ok([]) and _rows_ok([r for r in good if len(r) == 3]) and _rows_ok([r for r in good if len(r) == 5])
    bad = {
        "row not a list": (0, ("a.weight", [4, 3], 5)),
        "row of four": (0, ["a.weight", [4, 3], 5, 1]),
        "row of six": (1, ["a.bias", [4], 2, 1, 5, 0]),
        "name not text": (0, [7, [4, 3], 5]),
        "empty name": (0, ["", [4, 3], 5]),
        "long name": (0, ["x" * 1025, [4, 3], 5]),
        "repeated name": (2, ["a.weight", [2, 2, 1, 1], 4]),
        "shape not a list": (0, ["a.weight", (4, 3), 5]),
        "empty shape": (0, ["a.weight", [], 0]),
        "nine dimensions": (0, ["a.weight", [1] * 9, 0]),
        "negative dimension": (0, ["a.weight", [-4, 3], 0]),
        "dimension as bool": (0, ["a.weight", [True, 3], 1]),
        "dimension as float": (0, ["a.weight", [4.0, 3], 5]),
        "too many elements": (0, ["a.weight", [MAX_NUMEL, 2], 5]),
        "kept beyond numel": (0, ["a.weight", [4, 3], 13]),
        "negative kept": (0, ["a.weight", [4, 3], -1]),
        "kept as bool": (0, ["a.weight", [4, 3], True]),
        "Rice k of 32": (1, ["a.bias", [4], 2, 32, 5]),
        "negative Rice k": (1, ["a.bias", [4], 2, -1, 5]),
        "Rice k as float": (1, ["a.bias", [4], 2, 1.0, 5]),
        "unary bits beyond numel and kept": (3, ["c", [7], 7, 0, 15]),
        "negative unary bits": (3, ["c", [7], 7, 0, -1]),
    }
    for what, (i, row) in bad.items():
        rows = [list(r) for r in good]
        rows[i] = row
        assert not row_by_row(rows), what
        assert not _rows_ok(rows), what


def test_a_shared_tensor_index_is_checked_once_and_never_stands_in_for_other_rows():
    """Switches of one backbone share an Index (names and shapes, checked once); rows whose names
    and shapes compare equal to a cached one's without being the same (True == 1.0 == 1) are
    checked afresh and rejected, and each file's own kept counts are checked on a cache hit too."""
    from switchbank.layout import _rows_index

    first = _rows_index([["a", [1, 3], 2], ["b", [4], 4, 1, 5]])
    again = _rows_index([["a", [1, 3], 3], ["b", [4], 0, 2, 4]])
    assert first is not None and again is first
    assert first.offsets == (0, 1) and first.bitmaps == 2 and first.numel.tolist() == [3, 4]
    for dims in ([True, 3], [1.0, 3]):
        assert _rows_index([["a", dims, 2], ["b", [4], 4, 1, 5]]) is None, dims
    assert _rows_index([["a", [1, 3], 4], ["b", [4], 4, 1, 5]]) is None  # kept beyond numel
    assert _rows_index([["a", [1, 3], True], ["b", [4], 4, 1, 5]]) is None
    assert _rows_index([["a", [1, 3], 2], ["b", [4], 4, 1, 9]]) is None  # unary bits beyond numel and kept

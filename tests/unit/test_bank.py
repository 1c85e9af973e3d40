import json
import os

import pytest
from switchbank.bank import Bank
from switchbank.errors import Conflict, CorruptSwitch, InvalidInput, NotFound
from switchbank.format import describe, to_bytes
from tests.helpers import make_switch


@pytest.fixture(scope="module")
def files(tower):
    a1 = to_bytes(make_switch(tower, "a", seed=1))
    a2 = to_bytes(make_switch(tower, "a", seed=2))
    b = to_bytes(make_switch(tower, "b", seed=3))
    return a1, a2, b


def test_add_replace_remove_and_generation(tmp_path, files):
    a1, a2, b = files
    bank = Bank(tmp_path / "bank", create=True)
    assert bank.generation == 0 and bank.names() == []
    sw, changed = bank.add(a1)
    assert changed and bank.generation == 1 and bank.names() == ["a"]
    assert bank.add(a1)[1] is False and bank.generation == 1  # identical re-add: idempotent
    with pytest.raises(Conflict):
        bank.add(a2)
    assert bank.load("a").content_hash == sw.content_hash
    sw2, _ = bank.add(a2, replace=True)
    assert bank.generation == 2 and bank.load("a").content_hash == sw2.content_hash
    bank.add(b)
    bank.remove("a")
    assert bank.names() == ["b"] and bank.generation == 4
    assert sorted(p.name for p in bank.files.iterdir()) == [bank.manifest().switches["b"]["file"]]
    with pytest.raises(NotFound):
        bank.remove("a")
    gen, loaded = Bank(bank.root).load_all()
    assert gen == 4 and list(loaded) == ["b"]


def test_bad_uploads_leave_the_bank_unchanged(tmp_path, files, tower):
    a1 = files[0]
    bank = Bank(tmp_path, create=True)
    bank.add(a1)
    before = (bank.manifest(), sorted(os.listdir(bank.files)))
    for bad in (a1[:-20], b"not a switch at all", a1[:100] + bytes([a1[100] ^ 1]) + a1[101:]):
        with pytest.raises(CorruptSwitch):
            bank.add(bad)
    with pytest.raises(InvalidInput, match="invalid switch name"):
        bank.add(to_bytes(make_switch(tower, "../evil", seed=9)))

    def refuse(sw):
        raise Conflict("no")
    with pytest.raises(Conflict):
        bank.add(files[2], validate=refuse)
    assert (bank.manifest(), sorted(os.listdir(bank.files))) == before


@pytest.mark.parametrize("fail_at", [1, 2])  # 1: renaming the switch file, 2: renaming the manifest
def test_crash_mid_update_keeps_previous_state(tmp_path, files, monkeypatch, fail_at):
    a1, a2, _ = files
    bank = Bank(tmp_path, create=True)
    bank.add(a1)
    old = bank.load("a").content_hash
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("injected failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        bank.add(a2, replace=True)
    monkeypatch.setattr(os, "replace", real_replace)
    fresh = Bank(tmp_path)
    assert fresh.generation == 1 and fresh.load("a").content_hash == old
    assert not [p for p in os.listdir(fresh.files) if p.endswith(".part")]  # temp files cleaned up


def test_leftover_files_of_a_crashed_writer_are_ignored_and_collected(tmp_path, files, monkeypatch):
    a1, a2, b = files
    bank = Bank(tmp_path, create=True)
    bank.add(a1)

    def crash_leftovers():
        (bank.files / ".tmp-crashed.part").write_bytes(b[:50])  # a writer died mid-write
        (bank.files / "b.0123456789abcdef.safetensors").write_bytes(b)  # died before the manifest

    def named():
        return sorted(i["file"] for i in Bank(tmp_path).manifest().switches.values())

    crash_leftovers()
    assert Bank(tmp_path).names() == ["a"]
    Bank(tmp_path).add(b)  # a process's first change sweeps the directory
    assert sorted(os.listdir(bank.files)) == named()
    # a long-lived writer only deletes what its changes leave unnamed, and sweeps every SWEEP_EVERY changes
    monkeypatch.setattr(Bank, "SWEEP_EVERY", 3)
    bank.remove("b")
    crash_leftovers()
    bank.add(a2, replace=True)
    assert len(os.listdir(bank.files)) == 3 and named() == [bank.manifest().switches["a"]["file"]]
    bank.add(b)
    assert sorted(os.listdir(bank.files)) == named()


def test_manifest_is_one_line_per_switch_and_read_again_only_when_it_changes(tmp_path, files):
    a1, a2, b = files
    bank = Bank(tmp_path, create=True)
    bank.add_many([a1, b])
    text = (tmp_path / "manifest.json").read_text()
    lines = text.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines if ln.startswith("  ")] == ['"a"', '"b"']
    assert json.loads(text)["switches"]["b"] == bank.manifest().switches["b"] and json.loads(text)["generation"] == 1
    other = Bank(tmp_path)  # another replica's view of the same directory
    assert other.manifest().switches == bank.manifest().switches
    bank.add(a2, replace=True)
    assert other.generation == 2 and other.manifest().switches["a"]["content_hash"] == bank.load("a").content_hash
    (tmp_path / "manifest.json").write_text(text.replace('"generation": 1', '"generation": 7'))
    assert other.generation == 7 and bank.generation == 7  # edited by hand: read again
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(Exception, match="unreadable bank manifest"):
        other.manifest()


def test_a_change_that_fails_leaves_no_file_behind(tmp_path, files, monkeypatch):
    a1, a2, b = files
    bank = Bank(tmp_path, create=True)
    bank.add(a1)
    before = sorted(os.listdir(bank.files))

    def fail(m):
        raise OSError("disk full")
    monkeypatch.setattr(bank, "_write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        bank.add_many([a2, b], replace=True)
    assert sorted(os.listdir(bank.files)) == before and Bank(tmp_path).generation == 1


def test_not_a_bank(tmp_path):
    with pytest.raises(Exception, match="not a switch bank"):
        Bank(tmp_path)


def test_add_many_is_one_change_and_checks_everything_first(tmp_path, files):
    a1, a2, b = files
    bank = Bank(tmp_path / "many", create=True)
    assert bank.add_many([a1, b]) == 2 and bank.generation == 1 and bank.names() == ["a", "b"]
    assert bank.add_many([a1, b]) == 0 and bank.generation == 1
    with pytest.raises(Conflict):
        bank.add_many([a2])
    with pytest.raises(CorruptSwitch):
        bank.add_many([a2, b"junk"])  # one bad file: nothing is written
    assert bank.load("a").content_hash == Bank(bank.root).load("a").content_hash and bank.generation == 1
    assert bank.add_many([a2], replace=True) == 1 and bank.generation == 2


def test_light_load_reads_everything_but_the_bits(tmp_path, files):
    from switchbank.format import load_bits
    a1, _, _ = files
    bank = Bank(tmp_path / "light", create=True)
    full, _ = bank.add(a1)
    light = bank.load("a", light=True)
    assert not light.loaded and light.head is not None and light.entries == full.entries
    # described as the whole switch is, before its bits are read
    assert describe(light, len(a1)) == describe(full, len(a1)) | {"resident_bits_per_param": 0.0}
    load_bits(light)
    assert light.loaded and light.mask.equal(full.mask) and light.pos.equal(full.pos)


def test_a_listed_switch_holds_its_entries_as_columns_of_its_layout(tmp_path, files):
    from switchbank.types import Entries
    a1, _, b1 = files
    bank = Bank(tmp_path / "columns", create=True)
    full, _ = bank.add(a1)
    bank.add(b1)
    a, b = bank.load("a", light=True), bank.load("b", light=True)
    assert isinstance(a.entries, Entries) and list(a.entries) == list(full.entries)
    assert a.entries[1:3] == list(full.entries)[1:3] and a.entries[-1] == full.entries[-1]
    first = full.entries[0]
    assert a.entry_map().get(first.name) == first and a.entry_map().get("no such tensor") is None
    assert a.shapes() == {e.name: e.shape for e in full.entries}
    assert a.shapes() is b.shapes()  # switches of one layout share it
    assert a.entries != list(full.entries)[:-1]

"""A bank: a directory of switch files and a manifest, changed atomically.

Layout::

    BANK/manifest.json                      {"format", "version", "generation", "switches": {...}}
    BANK/switches/NAME.HASH16.safetensors   content-addressed switch files
    BANK/.lock                              writers hold an exclusive flock while changing the bank

A change writes the new switch file (temp file, fsync, rename), then the new manifest the same way,
then deletes the files it no longer names. A crash at any point leaves a manifest that names
only complete files, so the bank reads as either the old or the new state; what a crashed writer
left behind is swept up by a later change (the first one a process makes, then every
``Bank.SWEEP_EVERY``-th). Readers never need the lock: they read the manifest (always complete,
thanks to rename) and retry if a file it named was removed in between. The generation number grows
by one with every change.

The manifest holds one line per switch. Nothing in a change costs time in proportion to the bank
but writing those lines out: each is encoded once and kept, and a manifest read again unchanged is
not parsed again (at 3,000 switches, encoding, parsing and listing the whole bank took about 23 ms
of an upload's 42, in process).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import Conflict, CorruptSwitch, InvalidInput, NotFound, SwitchBankError
from .format import Layout, from_bytes, read_layout, read_light, read_switch
from .types import Switch

MANIFEST = "manifest.json"
BANK_FORMAT = "switchbank-bank"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidInput(
            f"invalid switch name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def file_name(name: str, content_hash: str) -> str:
    """A switch's file in the bank: its name and content hash, so a new version never overwrites
    the file an older manifest names."""
    return f"{name}.{content_hash.split(':')[-1][:16]}.safetensors"


@dataclass(frozen=True)
class Manifest:
    generation: int
    switches: dict[str, dict]  # name -> {"file", "content_hash", "bytes"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; replicas running as other users must read it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class Bank:
    SWEEP_EVERY = 100  # changes between sweeps of the whole directory for a crashed writer's files

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        self.files = self.root / "switches"
        self._read: tuple[bytes, Manifest] | None = None  # the manifest's bytes as last read, parsed
        self._lines: dict[str, tuple[dict, str]] = {}  # name -> (its entry, its line as written)
        self._changes = 0
        if create:
            self.files.mkdir(parents=True, exist_ok=True)
            if not (self.root / MANIFEST).exists():
                with self._locked():
                    if not (self.root / MANIFEST).exists():
                        self._write_manifest(Manifest(0, {}))
        if not (self.root / MANIFEST).is_file():
            raise SwitchBankError(f"{self.root} is not a switch bank (no {MANIFEST}); create one with `switchbank bank init {self.root}`")
        self.manifest()  # fail early on an unreadable manifest

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def manifest(self) -> Manifest:
        """The manifest as it is on disk now. Its entries are shared between calls: read them, do
        not change them."""
        path = self.root / MANIFEST
        try:
            data = path.read_bytes()
            last = self._read
            if last is not None and last[0] == data:  # comparing the bytes costs far less than parsing them
                return Manifest(last[1].generation, dict(last[1].switches))
            raw = json.loads(data)
            if raw.get("format") != BANK_FORMAT or raw.get("version") != 1:
                raise ValueError("not a switchbank bank manifest of version 1")
            m = Manifest(int(raw["generation"]), dict(raw["switches"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SwitchBankError(f"{path}: unreadable bank manifest ({exc})") from None
        self._read = (data, m)
        return Manifest(m.generation, dict(m.switches))

    def _write_manifest(self, m: Manifest) -> None:
        data = self._encode(m)
        atomic_write(self.root / MANIFEST, data)
        self._read = (data, Manifest(m.generation, dict(m.switches)))

    def _encode(self, m: Manifest) -> bytes:
        """The manifest as JSON, one line per switch, keys sorted; each switch's line encoded once."""
        lines, kept = [], {}
        for name in sorted(m.switches):
            entry = m.switches[name]
            known = self._lines.get(name)
            if known is None or (known[0] is not entry and known[0] != entry):
                known = (entry, f"  {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}")
            kept[name] = known
            lines.append(known[1])
        self._lines = kept
        switches = "{\n" + ",\n".join(lines) + "\n }" if lines else "{}"
        return (f'{{\n "format": {json.dumps(BANK_FORMAT)},\n "generation": {int(m.generation)},\n'
                f' "switches": {switches},\n "version": 1\n}}\n').encode()

    @property
    def generation(self) -> int:
        return self.manifest().generation

    def names(self) -> list[str]:
        return sorted(self.manifest().switches)

    def load(self, name: str, retries: int = 5, light: bool = False, info: dict | None = None) -> Switch:
        """Read and verify one switch (retrying if a concurrent change removed the file). With
        ``light``, everything but its bits, which format.load_bits reads when they are needed.
        ``info`` is its manifest entry when the caller has just read the manifest."""
        for attempt in range(retries):
            if info is None or attempt:
                info = self.manifest().switches.get(name)
            if info is None:
                raise NotFound(f"no switch named {name!r} in the bank")
            path = self.files / info["file"]
            try:
                sw = read_light(path) if light else read_switch(path)
            except CorruptSwitch:
                if path.exists():
                    raise
                continue
            if sw.content_hash != info["content_hash"]:
                raise CorruptSwitch(f"{path}: content hash differs from the manifest's")
            return sw
        raise SwitchBankError(f"switch {name!r} kept changing while being read")

    def load_all(self) -> tuple[int, dict[str, Switch]]:
        """A consistent snapshot: (generation, every switch), retried if the bank changed meanwhile."""
        for _ in range(10):
            m = self.manifest()
            try:
                out = {n: read_switch(self.files / i["file"]) for n, i in m.switches.items()}
            except CorruptSwitch:
                if self.manifest().generation != m.generation:
                    continue
                raise
            return m.generation, out
        raise SwitchBankError("the bank kept changing while being read")

    def add(self, data: bytes, *, replace: bool = False, validate: Callable[[Switch], None] | None = None,
            check: Callable[[Layout], None] | None = None) -> tuple[Switch, bool]:
        """Verify and store a switch file's bytes. Returns (switch, changed).

        ``check(layout)`` runs on the declared layout before anything is decoded, ``validate(switch)``
        on the decoded switch. An identical file under the same name changes nothing; a different
        one is a Conflict unless ``replace``. Nothing on disk changes unless every check passes.
        """
        layout = read_layout(data)
        check_name(layout.meta["name"])
        sw = from_bytes(data, check)
        if validate:
            validate(sw)
        return sw, self._store([(sw.name, sw.content_hash, data)], replace) > 0

    def add_many(self, datas: list[bytes], *, replace: bool = False) -> int:
        """Verify and store many switch files under one manifest change (one generation). Returns
        how many changed the bank. All are verified before anything is written."""
        checked = []
        for data in datas:
            sw = from_bytes(data)
            check_name(sw.name)
            checked.append((sw.name, sw.content_hash, data))
        if len({name for name, _, _ in checked}) != len(checked):
            raise InvalidInput("two of the files hold switches of the same name")
        return self._store(checked, replace)

    def _store(self, items: list[tuple[str, str, bytes]], replace: bool) -> int:
        """Write the verified (name, content hash, file bytes) that differ from the bank, under one
        manifest change. An identical file under the same name changes nothing; a different one is
        a Conflict unless ``replace``, and then nothing is written. Returns how many changed."""
        with self._locked():
            m = self.manifest()
            entries = dict(m.switches)
            todo = [(n, h, d) for n, h, d in items if entries.get(n, {}).get("content_hash") != h]
            taken = [n for n, _, _ in todo if n in entries]
            if taken and not replace:
                raise Conflict(f"a different switch named {taken[0]!r} exists; ask for replacement to overwrite it")
            written = []
            try:
                for name, h, data in todo:
                    fname = file_name(name, h)
                    atomic_write(self.files / fname, data)
                    written.append(fname)
                    entries[name] = {"file": fname, "content_hash": h, "bytes": len(data)}
                if todo:
                    self._write_manifest(Manifest(m.generation + 1, entries))
            except BaseException:
                self._forget_unnamed(m, written)
                raise
            if todo:
                self._collect_garbage(m.switches, entries)
        return len(todo)

    def remove(self, name: str) -> None:
        with self._locked():
            m = self.manifest()
            if name not in m.switches:
                raise NotFound(f"no switch named {name!r} in the bank")
            entries = {k: v for k, v in m.switches.items() if k != name}
            self._write_manifest(Manifest(m.generation + 1, entries))
            self._collect_garbage(m.switches, entries)

    def _collect_garbage(self, before: dict[str, dict], after: dict[str, dict]) -> None:
        """Delete the files a change left unnamed; now and then, every file no entry names (what a
        crashed writer left, here or in another process). Lock held."""
        live = {i["file"] for i in after.values()}
        if self._changes % self.SWEEP_EVERY == 0:
            self._delete([p.name for p in self.files.iterdir() if p.name not in live])
        else:
            self._delete([i["file"] for i in before.values() if i["file"] not in live])
        self._changes += 1

    def _forget_unnamed(self, before: Manifest, written: list[str]) -> None:
        """After a failed change: delete the files it wrote, unless its manifest made it to disk
        after all (the failure came later) or the old manifest names them. Lock held."""
        try:
            if self.manifest().generation != before.generation:
                return
        except SwitchBankError:
            return
        live = {i["file"] for i in before.switches.values()}
        self._delete([f for f in written if f not in live])

    def _delete(self, names: list[str]) -> None:
        for name in names:
            try:
                (self.files / name).unlink()
            except FileNotFoundError:
                pass

    def file_size(self, name: str) -> int:
        info = self.manifest().switches.get(name)
        if info is None:
            raise NotFound(f"no switch named {name!r} in the bank")
        return int(info["bytes"])

"""The allocator settings the server applies at start-up (switchbank.backbone.keep_freed_memory)."""

from switchbank import backbone


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_sets_mmap_and_trim_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(backbone.ctypes, "CDLL", lambda name: libc)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    backbone.keep_freed_memory()
    assert libc.calls == [(-3, backbone.MMAP_THRESHOLD), (-1, backbone.TRIM_THRESHOLD)]


def test_environment_settings_win(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(backbone.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    backbone.keep_freed_memory()
    assert libc.calls == []


def test_other_c_libraries_are_left_alone(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(backbone.ctypes, "CDLL", missing)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    backbone.keep_freed_memory()  # no error

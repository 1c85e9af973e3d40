"""The allocator settings the server applies at start-up, and handing freed memory back."""

from switchbank import allocator


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_sets_mmap_and_trim_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    allocator.keep_freed_memory()
    assert libc.calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]


def test_environment_settings_win(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    allocator.keep_freed_memory()
    assert libc.calls == []


def test_other_c_libraries_are_left_alone(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(allocator.ctypes, "CDLL", missing)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    allocator.keep_freed_memory()  # no error


def test_freed_memory_is_handed_back_where_the_c_library_is_glibc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    allocator.release_freed_memory()
    assert libc.calls == [("trim", 0)]

    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(allocator.ctypes, "CDLL", missing)
    allocator.release_freed_memory()  # no error

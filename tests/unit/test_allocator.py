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


def _mapping_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping that holds ``address`` (Linux), or None where there are none."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_plain_pages_are_ordinary_pages_that_hold_what_is_written():
    import torch
    t = allocator.plain_pages((3000, 1280), torch.float16)  # 7.7 MB
    assert t.shape == (3000, 1280) and t.dtype == torch.float16 and t.is_contiguous()
    t.fill_(0.5)
    t[1234, 7] = 2.0
    assert float(t.float().sum()) == 0.5 * 3000 * 1280 + 1.5
    flags = _mapping_flags(t.data_ptr())
    if flags is not None:
        assert "hg" not in flags  # never advised to take transparent huge pages
    small = allocator.plain_pages((4, 8), torch.bfloat16)
    assert small.shape == (4, 8) and small.dtype == torch.bfloat16

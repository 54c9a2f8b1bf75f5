"""Huge-page host memory (cpu_kernels.hostmem): same data as plain tensors, advised pages where offered."""
import numpy as np
import pytest
import torch

from moe.cpu_kernels import hostmem
from moe.cpu_kernels.hostmem import HUGE_PAGE, empty_huge, empty_huge_np, huge_pages_enabled, mapping_of, pack


def advised(addr: int) -> bool | None:
    m = mapping_of(addr)
    return None if m is None else m["advised"]


needs_thp = pytest.mark.skipif(not huge_pages_enabled(), reason="no transparent huge pages on this host")


@pytest.mark.parametrize("shape,dtype", [((1000, 4096), torch.bfloat16), ((3, 700, 513), torch.float32),
                                         ((2816, 2048), torch.int8), ((7,), torch.float32), ((0, 5), torch.int8),
                                         ((), torch.float64)])
def test_empty_huge_is_a_usable_tensor_of_the_shape(shape, dtype):
    """Right shape, dtype, contiguity; writable; big ones start on a huge-page boundary."""
    t = empty_huge(shape, dtype)
    assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(3)
    assert bool((t == 3).all())
    if t.numel() * t.element_size() >= HUGE_PAGE and huge_pages_enabled():
        assert t.data_ptr() % HUGE_PAGE == 0


@needs_thp
def test_big_arrays_are_advised_as_huge_pages():
    """The mapping behind a big array carries the huge-page advice ('hg'); a small one is plain numpy."""
    a = empty_huge_np(3 * HUGE_PAGE + 12345)
    if advised(a.ctypes.data) is None:
        pytest.skip("no /proc/self/smaps")
    a[:] = 1  # touch every page
    m = mapping_of(a.ctypes.data)
    assert m["advised"] and m["kb"] == 3 * HUGE_PAGE >> 10 and m["huge_kb"] <= m["kb"]
    # the tail past the last whole huge page is not advised: no 2 MiB page over 12 KiB of data
    assert advised(a.ctypes.data + 3 * HUGE_PAGE) is False
    assert empty_huge_np(4096).base is None


def test_fallback_without_thp_gives_plain_memory(monkeypatch):
    """With huge pages off the helpers still return correct (ordinary) memory."""
    monkeypatch.setattr(hostmem, "huge_pages_enabled", lambda: False)
    t = empty_huge((1024, 1024), torch.float32)
    t.copy_(torch.arange(1 << 20, dtype=torch.float32).view(1024, 1024))
    assert t[1023, 1023] == (1 << 20) - 1
    got = pack([torch.ones(600, 1024), torch.zeros(3)])
    assert torch.equal(got[0], torch.ones(600, 1024)) and torch.equal(got[1], torch.zeros(3))


@pytest.mark.parametrize("big", [False, True])
def test_pack_copies_each_tensor_aligned_and_independent(big):
    """pack returns equal, 64-byte-aligned, contiguous copies that do not alias the inputs."""
    g = torch.Generator().manual_seed(0)
    n = 1100 if big else 7  # big: 2.7 MB in all, past one huge page
    ts = [torch.randn(n, 513, generator=g), torch.randint(-128, 127, (n, 301), dtype=torch.int8, generator=g),
          torch.randn(n, 33, generator=g).bfloat16(), torch.empty(0, 4), torch.randn(9, 5, generator=g).t()]
    got = pack(ts)
    assert len(got) == len(ts)
    for a, b in zip(ts, got):
        assert b.shape == a.shape and b.dtype == a.dtype and b.is_contiguous() and torch.equal(a, b)
        assert b.data_ptr() % 64 == 0 or b.numel() == 0
    got[0].zero_()
    assert ts[0].abs().sum() > 0
    if big and huge_pages_enabled():
        assert advised(got[0].data_ptr()) in (True, None)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
        empty_huge_np(-1)
    with pytest.raises(ValueError, match="shape must hold ints >= 0"):
        empty_huge((2, -3), torch.float32)
    with pytest.raises(ValueError, match="pack takes CPU tensors"):
        pack([np.zeros(3)])


def test_thp_mode_reads_the_bracketed_setting(tmp_path, monkeypatch):
    """'always [madvise] never' -> 'madvise'; an unreadable file -> None."""
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(hostmem, "_THP_ENABLED", str(f))
    assert hostmem.thp_mode() in ("madvise", None)  # None off Linux
    monkeypatch.setattr(hostmem, "_THP_ENABLED", str(tmp_path / "missing"))
    assert hostmem.thp_mode() is None

"""Give back the resident pages of a memory-mapped model file once their bytes have been copied.

The GGUF loader keeps quantized blocks as views of a copy-on-write map of the file. Fusing a
layer's q/k/v (and gate/up) copies their blocks into one tensor; the originals are then referenced
by nothing, but their pages stay resident and count in the process's memory until the map is
closed, which it never is while the model lives. ``FilePages.release`` drops them
(``madvise(MADV_DONTNEED)``): a page of a private file map that was never written is read again
from the file if it is ever touched, so this changes memory, never contents. The same holds for
the map safetensors reads a draft through, once each tensor is copied out. Only whole pages inside
a map of the named file are dropped; elsewhere (another OS, an anonymous tensor) it does nothing.

``trim_heap`` does the same for the process's heap once loading is done (glibc's ``malloc_trim``).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys

_MADV_DONTNEED = 4


def _file_regions(path: str) -> list[tuple[int, int]]:
    """[(start, end)] of this process's maps of ``path`` (Linux /proc/self/maps)."""
    target = os.path.realpath(path)
    regions = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target:
                    lo, hi = fields[0].split("-")
                    regions.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return regions


@functools.cache
def _madvise():
    """libc's madvise, or None (not a POSIX libc)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise  # the process's own symbols include libc's
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


class FilePages:
    """The maps of one file in this process (read once: make it after the file is mapped)."""

    def __init__(self, path: str):
        self.regions = _file_regions(path)

    def release(self, tensors=None) -> int:
        """Drop the resident pages wholly inside each CPU tensor's bytes that lie in these maps
        (``tensors=None``: every page of them, for a reader whose copies are already made). The
        maps must never have been written. Returns the bytes released (0 where the OS offers no way)."""
        madvise = _madvise() if self.regions else None
        if madvise is None:
            return 0
        spans = self.regions if tensors is None else [
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
        page, released = mmap.PAGESIZE, 0
        for lo, hi in spans:
            for r_lo, r_hi in self.regions:
                start, end = max(lo, r_lo), min(hi, r_hi)
                start, end = -(-start // page) * page, end // page * page  # whole pages only
                if end > start and madvise(start, end - start, _MADV_DONTNEED) == 0:
                    released += end - start
        return released


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another libc or OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc's; musl has none
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Give the free pages inside the heap back to the OS. Loading frees many temporaries (the
    tokenizer's build, a draft's quantization) between weights that stay, and glibc keeps the pages
    of such holes resident; trimming once, after loading, lowers the peak that generation adds to.
    Returns whether anything was given back (False where the libc offers no way)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False

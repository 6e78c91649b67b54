"""FilePages.release: the resident pages of a file map are given back, the values stay."""
import os
import sys

import numpy as np
import pytest
import torch

from mirror_rt.models.file_pages import FilePages


def _resident_kb(path) -> int:
    """Rss of this process's maps of ``path`` (Linux smaps)."""
    total, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip().endswith(real)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc/self/smaps (Linux)")
def test_pages_are_released_and_read_back_unchanged(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.random.default_rng(0).integers(0, 255, size=3 * 2**20 + 123, dtype=np.uint8)
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    tensor = torch.from_numpy(mapped[100:])  # starts inside a page: that page stays
    before = int(tensor.sum())
    assert _resident_kb(path) > 2900
    released = FilePages(str(path)).release([tensor])
    assert released >= 3 * 2**20 - 8192 and released % 4096 == 0
    assert _resident_kb(path) < 100
    assert int(tensor.sum()) == before and torch.equal(tensor, torch.from_numpy(values[100:]))


def test_tensors_outside_the_file_are_left_alone(tmp_path):
    path = tmp_path / "weights.bin"
    np.zeros(8192, dtype=np.uint8).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # the file is mapped, the tensor is not in it
    anonymous = torch.arange(2**20, dtype=torch.float32)
    assert FilePages(str(path)).release([anonymous]) == 0 and mapped.size == 8192
    assert torch.equal(anonymous, torch.arange(2**20, dtype=torch.float32))
    assert FilePages(str(tmp_path / "not_mapped.bin")).release() == 0

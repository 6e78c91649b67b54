"""Test set-up: CPU by default; Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
Tests marked ``gpu`` run the compiled kernels and are skipped without a CUDA device.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the tensors here are tiny, and lane tests run a draft thread beside the
# target; oversubscribed OpenMP teams spin and make small ops 30x slower on 2 cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)

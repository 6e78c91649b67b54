"""Building modules on the meta device (shapes only; the weights are assigned afterwards).

``nn.Embedding`` draws its initial weights with ``nn.init.normal_``, and on meta tensors that runs
through ``torch._refs``, whose first call imports ``torch._dynamo`` (and sympy): most of a second of
every start for values a meta tensor does not even hold. ``meta_device()`` skips that draw.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


class _SkipMetaInit(TorchFunctionMode):
    """Returns meta tensors from nn.init.normal_ untouched, and computes ``torch.arange`` tables on
    the CPU (their arithmetic on meta tensors would go through torch._refs too). A per-thread
    mode: other threads' real modules still get their initial values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        if func is torch.arange and "device" not in kwargs:  # a small table (rotary), never a weight
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def meta_device():
    """``with torch.device("meta")`` without the initial-value draws nobody reads."""
    with torch.device("meta"), _SkipMetaInit():
        yield

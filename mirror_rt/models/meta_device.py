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


def to_empty(module: torch.nn.Module, device) -> torch.nn.Module:
    """``module.to_empty(device=device)``: its meta parameters and buffers become uninitialised
    tensors on ``device`` (shared ones stay shared), made with ``torch.empty`` because
    ``Module.to_empty``'s ``empty_like`` of a meta tensor runs through torch._refs (importing
    torch._dynamo and sympy at its first call). Tensors already off the meta device are kept."""
    made = {}  # id of a meta tensor -> its replacement, so that shared tensors stay shared

    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=p.requires_grad)
                m._parameters[name] = made[id(p)]
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                if id(b) not in made:
                    made[id(b)] = torch.empty(b.shape, dtype=b.dtype, device=device)
                m._buffers[name] = made[id(b)]
    return module

"""``device=`` and ``dtype=`` as transformers users write them, checked before any loading.

    resolve_device("cuda")        -> torch.device, or ValueError naming what this torch has
    resolve_dtype("bf16", device) -> torch.bfloat16 ("bfloat16", "float32", "fp16", torch dtypes, ...)
"""
from __future__ import annotations

import torch

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available_devices() -> list[str]:
    """The device types this torch build can run on here, e.g. ['cpu', 'cuda (2 devices)']."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"cuda ({torch.cuda.device_count()} device{'s' if torch.cuda.device_count() > 1 else ''})")
    for kind in ("mps", "xpu", "npu"):
        module = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
        try:
            if module is not None and module.is_available():
                found.append(kind)
        except Exception:  # a half-installed backend: not available
            continue
    return found


def resolve_device(device) -> torch.device:
    """A torch.device this process can use; ValueError naming the problem and what is available."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); available: "
                         f"{', '.join(available_devices())}") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    have = ", ".join(available_devices())
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {str(device)!r} requested but this torch build has no CUDA "
                             f"(torch {torch.__version__}; available: {have})")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but no CUDA GPU is visible (available: {have})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but there are only "
                             f"{torch.cuda.device_count()} CUDA devices (available: {have})")
        return dev
    module = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
    try:
        ok = module is not None and module.is_available()
    except Exception:
        ok = False
    if not ok:
        raise ValueError(f"device {str(device)!r} requested but this torch cannot use {dev.type!r} here "
                         f"(available: {have})")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 elsewhere; a name ("bfloat16", "bf16", "fp16", "float32",
    "torch.float16", "auto" = the default) or a floating torch.dtype."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)} (or a torch float dtype)")
        return _DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype} is not a weight dtype; use one of {FLOAT_DTYPES}")
        return dtype
    raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {type(dtype).__name__}")

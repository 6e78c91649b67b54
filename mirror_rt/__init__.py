"""mirror_rt: Mirror Speculative Decoding runtime.

Public API (stable): ``load_model``, the decoders ``AutoregressiveDecoder``,
``SpeculativeDecoder``, ``MirrorDecoder`` with ``MirrorConfig``, ``AutoDecoder``, ``GenerationOutput``,
and the kernels in ``mirror_rt.ops`` (``tree_attention``, ``verify_accept``).

The names load on first use (module ``__getattr__``), so ``import mirror_rt`` and its command
line start without importing the decoders, the loaders or their dependencies.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_model": "mirror_rt.models",
    "AutoregressiveDecoder": "mirror_rt.decoders",
    "SpeculativeDecoder": "mirror_rt.decoders",
    "MirrorDecoder": "mirror_rt.decoders",
    "MirrorConfig": "mirror_rt.decoders",
    "AutoDecoder": "mirror_rt.decoders",
    "GenerationOutput": "mirror_rt.decoders",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mirror_rt' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])

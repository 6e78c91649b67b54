"""mirror_rt: Mirror Speculative Decoding runtime (greedy output token for token the target's,
sampling in the target's distribution).

Public API (stable):
* ``load_model(source, device=, dtype=, quant=)``: a Llama-family target or draft from a Hugging
  Face directory, a ``.safetensors`` file beside its ``config.json``, a ``.gguf`` file, or a loaded
  transformers model;
* the decoders ``AutoregressiveDecoder``, ``SpeculativeDecoder``, ``MirrorDecoder`` (the algorithm's
  settings in ``MirrorConfig``, where the draft runs in ``mirror_rt.placement.Placement``) and
  ``AutoDecoder`` (picks one of the three per request); ``generate`` returns a ``GenerationOutput``
  (``tokens`` [1, n] int64 and ``stats``);
* the kernels in ``mirror_rt.ops`` (``tree_attention``, ``verify_accept``, ``linear``).
The embedded default pair (SmolLM2-135M-Instruct, our draft and exit head):
``mirror_rt.default.load_default()``.

The names load on first use (module ``__getattr__``), so ``import mirror_rt`` and its command
line start without importing the decoders, the loaders or their dependencies.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_model": "mirror_rt.models",
    "from_hf": "mirror_rt.models.from_hf",
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

"""mirror_rt: Mirror Speculative Decoding runtime.

Public API (stable): ``load_model``, the decoders ``AutoregressiveDecoder``,
``SpeculativeDecoder``, ``MirrorDecoder`` with ``MirrorConfig``, ``GenerationOutput``,
and the kernels in ``mirror_rt.ops`` (``tree_attention``, ``verify_accept``).
"""
__version__ = "0.1.0"

from mirror_rt.decoders import (AutoregressiveDecoder, GenerationOutput, MirrorConfig, MirrorDecoder,  # noqa: E402
                                SpeculativeDecoder)
from mirror_rt.models import load_model  # noqa: E402

__all__ = ["load_model", "AutoregressiveDecoder", "SpeculativeDecoder", "MirrorDecoder", "MirrorConfig",
           "GenerationOutput", "__version__"]

"""mirror_rt: Mirror Speculative Decoding runtime.

Public API (stable): ``load_model``, the decoders ``AutoregressiveDecoder``,
``SpeculativeDecoder``, ``MirrorDecoder`` with ``MirrorConfig``, ``GenerationOutput``,
and the kernels in ``mirror_rt.ops`` (``tree_attention``, ``verify_accept``).
"""
__version__ = "0.1.0"

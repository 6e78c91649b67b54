"""Decoders sharing one interface: ``.generate(input_ids, max_new_tokens, eos_token_id=None,
temperature=0.0, seed=None) -> GenerationOutput(tokens [1, n], stats)``."""
from mirror_rt.decoders.autoregressive import AutoregressiveDecoder
from mirror_rt.decoders.base import GenerationOutput
from mirror_rt.decoders.speculative import SpeculativeDecoder

__all__ = ["AutoregressiveDecoder", "SpeculativeDecoder", "GenerationOutput"]
from mirror_rt.decoders.mirror import MirrorConfig, MirrorDecoder  # noqa: E402

__all__ += ["MirrorDecoder", "MirrorConfig"]
from mirror_rt.decoders.auto import AutoDecoder  # noqa: E402

__all__ += ["AutoDecoder"]

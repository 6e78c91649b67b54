"""Decoders sharing one interface: ``.generate(input_ids, max_new_tokens, eos_token_id=None,
temperature=0.0, seed=None, top_k=0, top_p=1.0, stream=None, stop=None, tokenizer=None)
-> GenerationOutput(tokens [1, n], stats)``."""
from mirror_rt.decoders.autoregressive import AutoregressiveDecoder
from mirror_rt.decoders.base import GenerationOutput
from mirror_rt.decoders.speculative import SpeculativeDecoder

__all__ = ["AutoregressiveDecoder", "SpeculativeDecoder", "GenerationOutput"]
from mirror_rt.decoders.mirror import DraftOptions, MirrorConfig, MirrorDecoder  # noqa: E402
from mirror_rt.placement import Placement  # noqa: E402

__all__ += ["MirrorDecoder", "MirrorConfig", "DraftOptions", "Placement"]
from mirror_rt.decoders.auto import AutoDecoder  # noqa: E402

__all__ += ["AutoDecoder"]

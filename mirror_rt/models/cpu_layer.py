"""One C++ call per decoder layer for the decoding steps of quantized layers on CPU.

``csrc/core/decoder_layer.h`` runs a whole layer (norms, fused q/k/v, rotary, the K/V write,
row-exact attention, output projection, MLP, residuals) where torch would make some forty small
calls, each a few microseconds of overhead next to a 135M model's tens of microseconds of work.
It applies where the model's eager attention is row-exact (``llama._row_exact``: float32 CPU
cache, no sliding window) and the layer is a fused quantized one without q/k
norms; every other layer runs in torch. Like the row-exact attention, each row's result depends
on that row alone, so speculative decoding stays equal to autoregressive decoding bit for bit.
"""
from __future__ import annotations

import weakref

import torch

from mirror_rt.models.quant import QuantLinear
from mirror_rt.models.quant_fused import QuantAttention, QuantMLP


class LayerStep:
    """A decoder layer's weights by address for ``_C.decoder_layer_step`` (it holds the tensors)."""

    def __init__(self, layer, config):
        from mirror_rt import _C

        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp  # the modules it was built from (a swapped module drops it)
        self.norms = (layer.input_layernorm.weight.detach().float().contiguous(),
                      layer.post_attention_layernorm.weight.detach().float().contiguous())
        mats = []
        for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            bias = None if m.bias is None else m.bias.detach().float().contiguous()
            mats.append((m.blocks, bias, (m.blocks.data_ptr(), m.out_features, m.in_features, m.qtype,
                                          0 if bias is None else bias.data_ptr(), m.packed)))
        # kept alive with the addresses given to C++; a tensor moved since (share_memory_() before a
        # process lane pickles the model) invalidates them, and the step is built again
        self.held = [t for t in (*self.norms, *(b for b, _, _ in mats), *(c for _, c, _ in mats)) if t is not None]
        self.addresses = tuple(t.data_ptr() for t in self.held)
        self.weights = _C.DecoderLayerWeights(config.hidden_size, attn.nh, attn.nkv, attn.hd, config.intermediate_size,
                                              float(layer.input_layernorm.eps), self.norms[0].data_ptr(),
                                              self.norms[1].data_ptr(), *(t for _, _, t in mats))
        self.step = _C.decoder_layer_step

    def run(self, x, cos, sin, k_buf, v_buf, plan):
        """x contiguous float32 [1, T, H], updated in place; cos/sin contiguous [T, D]; the cache
        buffers [1, S, Hkv, D] of this layer; plan the forward's row-exact ``_AttentionPlan``."""
        T = x.shape[1]
        prefix, nodes, bits = plan.row_keys
        mask, words = (0, 0) if bits is None else (bits.data_ptr(), bits.shape[-1])
        self.step(self.weights, x.data_ptr(), T, cos.data_ptr(), sin.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
                  k_buf.shape[1], plan.start, prefix, nodes, mask, words, torch.get_num_threads())

    def current(self, layer) -> bool:
        """Whether it still describes the layer: the same modules, their tensors where they were."""
        return (self.attn is layer.self_attn and self.mlp is layer.mlp
                and tuple(t.data_ptr() for t in self.held) == self.addresses)


def eligible(layer) -> bool:
    """A fused quantized layer without q/k norms, float32 RMSNorms with one epsilon."""
    attn, mlp = layer.self_attn, layer.mlp
    return (isinstance(attn, QuantAttention) and isinstance(mlp, QuantMLP) and attn.q_norm is None
            and isinstance(attn.o_proj, QuantLinear) and isinstance(mlp.down_proj, QuantLinear)
            and attn.o_proj.bias is None and mlp.down_proj.bias is None
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps
            and attn.qkv_proj.blocks.is_cpu)


# layer -> its LayerStep, or False where the layer runs in torch. Beside the module, not in it: a
# model pickled for a process lane must not carry C++ objects or addresses.
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def layer_step(layer, config) -> LayerStep | None:
    """The layer's LayerStep, built at its first use (None: the layer runs in torch)."""
    step = _STEPS.get(layer)
    if step is False or (step is not None and step.current(layer)):
        return step or None
    from mirror_rt import ops

    step = LayerStep(layer, config) if ops.cpu_ops() is not None and eligible(layer) else False
    _STEPS[layer] = step
    return step or None


def run_in_torch(layer) -> None:
    """Make the layer run in torch from now on (tests compare the two)."""
    _STEPS[layer] = False

"""Triton kernels of mirror_rt, installed as ``mirror_rt.triton_kernels``.

Reach them through ``mirror_rt.ops`` (which validates inputs and dispatches CUDA tensors here);
each launcher follows the matching torch reference in ``mirror_rt.ops.reference`` exactly.

- ``tree_attention.tree_attention``: T tree nodes (queries: the last Tq of them) over a committed
  prefix plus the tree, GQA-packed, prefix split across programs with a log-sum-exp merge,
  bit-packed tree mask (``pack_tree_mask`` / ``tree_attention_packed`` to pack once per step).
- ``verify_accept.verify_accept``: greedy / match / rejection verification of a token tree and
  the walk to the accepted path and next token, one launch per step (top-k/top-p and rejection
  use a torch ``process_logits`` pre-pass).

All kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do).
"""

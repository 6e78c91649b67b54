"""A model's forward, compiled where that is enabled: torch.compile(fullgraph=True) of the
static-shape forward, and CUDA graphs on a GPU (``mode="reduce-overhead"``).

``prepare(model, compile="auto")`` returns an object with the model's forward API (``embed``,
``run_layers``, ``head``, ``forward``/``__call__``, ``new_cache``, ``num_layers``, ``config``,
``device``, ``dtype``; anything else is the model's own). With ``compile=False`` it is the model.

What is compiled: the full forward (ids -> logits), ``run_layers`` for any layer range (the
prefix [0, l_e) and suffix [l_e, N) of Mirror-SD) and ``head``, each through the model's
``run_layers_static``, which reads the KV cache through its device length only. One compiled
artifact serves one *bucket*: (pieces, layer range, batch, new tokens T, cache capacity, tree
offset, which optional inputs are given). Decoding meets a handful of buckets (T = 1; window + 1;
the rollout tree sizes) and reuses them every step. A bucket compiles on its second use on one
cache, so the prompt's prefill (once per cache) stays eager; so do forwards of more than
``max_tokens`` new tokens and new buckets past ``max_buckets``. Caches made by the prepared
model's ``new_cache`` have their capacity rounded up (``CAPACITY_STEP``), so that prompts of
different lengths share artifacts (a cache of another capacity is another bucket).

A compile failure (or any error of the compiled path) warns once and leaves the model eager for
good; the eager forward then runs the same call, so a failure never costs a wrong token.
Compiled artifacts are cached on disk by inductor (its FX graph cache) under
``TORCHINDUCTOR_CACHE_DIR``, by default ``~/.cache/mirror_rt/inductor``: a second run of the same
model and buckets loads them instead of compiling.
"""
from __future__ import annotations

import os
import threading
import warnings
import weakref

import torch

COMPILE_CHOICES = (False, True, "auto")
CAPACITY_STEP = 256  # caches are allocated in multiples of this many tokens when compiled
# torch.compile's backend; MIRROR_RT_COMPILE_BACKEND=aot_eager traces and checks the same graphs
# without generating code (what the CPU tests use: inductor's C++ compile takes minutes there).
BACKEND = os.environ.get("MIRROR_RT_COMPILE_BACKEND", "inductor")


def _check_choice(compile):
    if not (compile is False or compile is True or (isinstance(compile, str) and compile == "auto")):
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")


def resolve(compile, device) -> bool:
    """Whether ``compile`` ("auto", True, False) means compiling on ``device``. "auto" compiles on
    CUDA, where the eager step waits on the host's kernel launches, and not on a CPU: there the
    step is bound by weight streaming and compiling a bucket costs tens of seconds that a typical
    generation does not earn back (bench/bench_step.py measures both; bench/RESULTS.md).
    MIRROR_RT_COMPILE=0|1 (off|on) decides "auto" instead; explicit True/False win over it."""
    _check_choice(compile)
    if compile == "auto":
        forced = os.environ.get("MIRROR_RT_COMPILE", "").strip().lower()
        if forced in ("0", "off", "false", "no", "1", "on", "true", "yes"):
            return forced in ("1", "on", "true", "yes")
        return torch.device(device).type == "cuda"
    return bool(compile)


def prepare(model, compile="auto", *, mode=None, backend=None, max_tokens: int = 64, max_buckets: int = 16,
            min_uses: int = 2):
    """The model, ready to run its forward compiled (compile=True), eagerly (False), or compiled
    where that is faster ("auto", see ``resolve``). mode: torch.compile's mode (default
    "reduce-overhead" on CUDA: CUDA graphs; None on CPU). backend: torch.compile's backend
    (default ``BACKEND``). max_tokens, max_buckets, min_uses: see ``CompiledModel``."""
    if not resolve(compile, model.device):
        return model
    if isinstance(model, CompiledModel):
        return model
    if not hasattr(model, "run_layers_static"):  # e.g. a wrapper: prepare what it wraps instead
        if compile is True:
            warnings.warn(f"mirror_rt: {type(model).__name__} has no static-shape forward to compile; "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
        return model
    backend = backend or BACKEND
    if mode is None and model.device.type == "cuda" and backend == "inductor":
        mode = "reduce-overhead"
    return CompiledModel(model, mode=mode, backend=backend, max_tokens=max_tokens, max_buckets=max_buckets,
                         min_uses=min_uses)


def _set_cache_dir():
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "mirror_rt", "inductor")


# The compiled functions: module-level so that every CompiledModel shares their code (dynamo keeps
# one cache entry per bucket and model on them).

def _layers(model, hidden, start, end, k_bufs, v_bufs, length_t, positions, tree_mask, tree_offset):
    return model.run_layers_static(hidden, start, end, k_bufs, v_bufs, length_t, positions, tree_mask, tree_offset)


def _forward(model, ids, k_bufs, v_bufs, length_t, positions, tree_mask, tree_offset):
    hidden = model.run_layers_static(model.embed(ids), 0, model.num_layers, k_bufs, v_bufs, length_t, positions,
                                     tree_mask, tree_offset)
    return model.head(hidden)


def _head(model, hidden):
    return model.head(hidden)


def _rebuild(model, mode, backend, max_tokens, max_buckets, min_uses):
    return CompiledModel(model, mode=mode, backend=backend, max_tokens=max_tokens, max_buckets=max_buckets,
                         min_uses=min_uses)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous inference tensor. Dynamo guards on dispatch keys (inference tensors and
    ordinary ones differ) and strides (even of size-1 dims): inputs (ids, positions, masks, the
    hidden state) that differ only in these would otherwise compile a bucket twice."""
    if t.is_inference() and t.stride() == _contiguous_strides(t.shape):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class CompiledModel:
    """A model whose forward pieces run compiled per bucket (see the module's docstring).
    Forwards of more than max_tokens new tokens run eagerly, as do new buckets once max_buckets
    are compiled; a bucket is compiled on its min_uses-th call."""

    def __init__(self, model, *, mode=None, backend="inductor", max_tokens: int = 64, max_buckets: int = 16,
                 min_uses: int = 2):
        if not hasattr(model, "run_layers_static"):
            raise TypeError(f"{type(model).__name__} has no static-shape forward (run_layers_static) to compile")
        _set_cache_dir()
        from mirror_rt.ops import library
        library._small_linear_rows()  # looked up eagerly: the import it makes cannot be traced
        self._limit = max(64, 4 * max_buckets)  # dynamo's per-code cache: every bucket of every model
        self._thread = threading.local()
        self.model = model
        self.mode, self.backend = mode, backend
        self.max_tokens, self.max_buckets = max_tokens, max_buckets
        self.min_uses = min_uses
        self.buckets: set = set()  # compiled (or being compiled)
        self._seen: dict = {}      # uses of buckets not compiled yet
        self.enabled = True
        self.error: BaseException | None = None
        opts = dict(fullgraph=True, dynamic=False, backend=backend, mode=mode)
        self._compiled = {name: torch.compile(fn, **opts) for name, fn in
                          (("layers", _layers), ("forward", _forward), ("head", _head))}
        self._cuda_graphs = mode in ("reduce-overhead", "max-autotune")
        self._static_caches = weakref.WeakSet()

    def __getattr__(self, name):  # config, num_layers, device, dtype, name, ... come from the model
        if name == "model":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)

    def __reduce__(self):
        """Pickled (to a process lane) as the model and the settings: the other process sets up
        its own compilation (dynamo's limits, its own buckets)."""
        return (_rebuild, (self.model, self.mode, self.backend, self.max_tokens, self.max_buckets, self.min_uses))

    def __repr__(self):
        return f"CompiledModel({self.model.name}, {len(self.buckets)} buckets, enabled={self.enabled})"

    # --- the forward API ---------------------------------------------------------------------

    def new_cache(self, max_len: int, batch: int = 1):
        """The model's cache, its capacity rounded up to a multiple of CAPACITY_STEP (within the
        model's context) so that generations of different lengths share compiled artifacts."""
        cache = self.model.new_cache(max_len, batch)  # checks max_len against the context
        rounded = min(-(-max_len // CAPACITY_STEP) * CAPACITY_STEP, self.config.max_position)
        if rounded > max_len:
            cache = self.model.new_cache(rounded, batch)
        return cache

    def _static(self, cache):
        """Under CUDA graphs, mark a cache's buffers as static addresses (once per cache), so that
        the graphs may update them in place; guard=False: a new cache of the same shape
        re-records a graph instead of recompiling."""
        if self._cuda_graphs and cache not in self._static_caches:
            for buf in cache.k + cache.v:
                torch._dynamo.mark_static_address(buf, guard=False)
            self._static_caches.add(cache)

    def embed(self, ids):
        return self.model.embed(ids)

    def run_layers(self, hidden, start: int, end: int, cache, positions=None, tree_mask=None, tree_offset: int = 0):
        """As ``LlamaModel.run_layers``, compiled for this bucket where enabled."""
        self.model.check_forward(hidden, start, end, cache, tree_mask, tree_offset)
        B, T, _ = hidden.shape
        key = ("layers", start, end, B, T, cache.max_len, tree_offset, positions is None, tree_mask is None,
               hidden.dtype)
        if self._use(key, T, cache):
            self._static(cache)
            out = self._run("layers", hidden, start, end, cache.k, cache.v, cache.length_t, positions, tree_mask,
                            tree_offset)
            if out is not None:
                return out
        return self.model.run_layers(hidden, start, end, cache, positions, tree_mask, tree_offset)

    def head(self, hidden):
        B, T, _ = hidden.shape
        if self._use(("head", B, T, hidden.dtype), T):
            out = self._run("head", hidden)
            if out is not None:
                return out
        return self.model.head(hidden)

    def forward(self, ids, cache, positions=None, tree_mask=None, tree_offset: int = 0):
        """As ``LlamaModel.forward``: logits [B, T, V] float32 of new tokens ids [B, T]."""
        B, T = ids.shape
        self.model.check_forward(ids[..., None], 0, self.num_layers, cache, tree_mask, tree_offset)
        key = ("forward", B, T, cache.max_len, tree_offset, positions is None, tree_mask is None)
        if self._use(key, T, cache):
            self._static(cache)
            out = self._run("forward", ids, cache.k, cache.v, cache.length_t, positions, tree_mask, tree_offset)
            if out is not None:
                return out
        return self.model.forward(ids, cache, positions, tree_mask, tree_offset)

    __call__ = forward

    # --- buckets and fallback ----------------------------------------------------------------

    def _use(self, key, T: int, cache=None) -> bool:
        """Whether this call runs compiled: a bucket is compiled on its min_uses-th call on one
        cache (a step shape recurs within a generation; the prompt's prefill does not, and stays
        eager like other one-off shapes)."""
        if key in self.buckets:
            return self.enabled
        if not self.enabled or T > self.max_tokens or len(self.buckets) >= self.max_buckets:
            return False
        owner, uses = self._seen.get(key, (False, 0))  # owner: a weak reference (ids are reused), None: no cache
        same = owner is None if cache is None else (owner not in (None, False) and owner() is cache)
        uses = uses + 1 if same else 1
        if uses < self.min_uses:
            self._seen[key] = (None if cache is None else weakref.ref(cache), uses)
            return False
        self._seen.pop(key, None)
        self.buckets.add(key)
        return True

    def _raise_limits(self):
        """Dynamo's recompile limits, raised in the calling thread (its config is per thread, and
        a lane's thread compiles the draft)."""
        if not getattr(self._thread, "done", False):
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, self._limit)
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * self._limit)
            self._thread.done = True

    def _run(self, piece: str, *args):
        """The compiled piece's output, or None after a failure (warned once; eager from then on)."""
        self._raise_limits()
        try:
            with torch.inference_mode():
                if self._cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                args = [_canonical(a) if isinstance(a, torch.Tensor) else a for a in args]
                out = self._compiled[piece](self.model, *args)
            # A CUDA graph's outputs live in its memory pool and the next replay overwrites them.
            return out.clone() if self._cuda_graphs else out
        except Exception as err:  # noqa: BLE001 - any failure of the compiled path falls back
            self.enabled, self.error = False, err
            warnings.warn(f"mirror_rt: compiling {self.model.name}'s forward failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly", RuntimeWarning,
                          stacklevel=3)
            return None

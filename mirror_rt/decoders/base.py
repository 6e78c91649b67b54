"""What every decoder shares: arguments, the generate set-up, sampling, emission, statistics.

Each decoder keeps the same bookkeeping: the committed tokens are in ``tokens`` (prompt and
generated), the last one is *pending* (committed, not yet fed to the target), and ``emit`` stops
exactly at EOS, at the end of a stop string, or at ``max_new_tokens``, even when a whole window
was accepted.

Host transfers. A step's decisions (the next token, how many drafted tokens were accepted) and
its checks (finite logits) are computed on the device and read back together with one
``read_back`` call, so a step waits for its device once.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mirror_rt import defaults
from mirror_rt.ops.reference import process_logits

MODES = ("greedy", "match", "rejection")


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [1, n] int64, the generated ids only (prompt excluded)
    stats: dict = field(default_factory=dict)


@dataclass
class GenerateArgs:
    """The public ``generate`` keywords, as one value the set-up and the steps pass around.

    eos_token_id  None: the model's own EOS ids (``config.eos_token_ids``); an int or a list of ints;
                  ``[]`` turns EOS off. The EOS token is kept in the output.
    stop          a string or list of strings; generation ends right after the token that completes
                  the first one (needs ``tokenizer``, anything with ``decode(ids)``)
    stream        a callable receiving each list of newly emitted token ids
    """

    max_new_tokens: int
    eos_token_id: object = None
    temperature: float = 0.0
    seed: int | None = None
    top_k: int = 0
    top_p: float = 1.0
    stream: object = None
    stop: object = None
    tokenizer: object = None

    def check(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        if not self.temperature >= 0:  # also refuses NaN, which would sample from NaN probabilities
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stream is not None and not callable(self.stream):
            raise TypeError("stream must be a callable receiving lists of token ids")
        return self


class Stats:
    """Per-run statistics: accepted-length histogram, phase times, counters."""

    def __init__(self, decoder: str):
        self.decoder = decoder
        self.accepted = Counter()  # accepted length -> steps
        self.phase_s = defaultdict(float)
        self.counters = Counter()
        self.t_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[name] += time.perf_counter() - t0

    @property
    def steps(self) -> int:
        return sum(self.accepted.values())

    def add_step(self, accepted: int):
        self.accepted[int(accepted)] += 1

    def mean_accepted_per_window(self, empty_steps: int) -> float:
        """Mean accepted length over the steps that verified a window (all but empty_steps)."""
        return sum(k * v for k, v in self.accepted.items()) / max(self.steps - empty_steps, 1)

    def finish(self, n_tokens: int, **extra) -> dict:
        wall = time.perf_counter() - self.t_start
        steps = sum(self.accepted.values())
        mean = sum(k * v for k, v in self.accepted.items()) / steps if steps else 0.0
        out = {
            "decoder": self.decoder,
            "new_tokens": n_tokens,
            "steps": steps,
            "accepted_hist": dict(sorted(self.accepted.items())),
            "mean_accepted": mean,
            "wall_s": wall,
            "tokens_per_s": n_tokens / wall if wall > 0 else 0.0,
            "phase_s": dict(self.phase_s),
            **dict(self.counters),
        }
        out.update(extra)
        return out


def as_prompt(input_ids, vocab_size: int, device) -> torch.Tensor:
    """Validate a prompt ([L] or [1, L] int ids) and return it as [L] int64 on device."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor of shape [1, L] or [L], got {type(input_ids).__name__}")
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must hold one sequence ([1, L]); got batch {input_ids.shape[0]}")
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [1, L] or [L], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return input_ids.to(device=device, dtype=torch.int64)


def check_window(value, what: str = "window") -> int:
    """A draft window length: an integer in [1, defaults.MAX_WINDOW] (the same limit for SD and Mirror-SD)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= defaults.MAX_WINDOW:
        raise ValueError(f"{what} must be an integer in [1, {defaults.MAX_WINDOW}], got {value!r}")
    return value


def check_context(model, prompt_len: int, max_new_tokens: int, slack: int) -> int:
    """Cache capacity for prompt + generation + one window of slack; raises if beyond the context."""
    need = prompt_len + max_new_tokens + slack
    limit = model.config.max_position
    if need > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + window slack "
                         f"({slack}) = {need} exceeds the model's context of {limit} tokens")
    return need


def check_pair(target, draft):
    """Draft and target must share a vocabulary: the same size and, where both loaders read the
    tokenizer (``tokenizer_tokens``), the same token at every id both tokenizers define."""
    from mirror_rt.models.from_hf import check_model  # a transformers model: TypeError naming load_model

    check_model(target, "target"), check_model(draft, "draft")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"draft vocabulary ({dv} tokens) differs from the target's ({tv}); "
                         "speculative decoding needs the same tokenizer")
    t_tok, d_tok = getattr(target, "tokenizer_tokens", None), getattr(draft, "tokenizer_tokens", None)
    if t_tok and d_tok and t_tok is not d_tok:
        for i, (t, d) in enumerate(zip(t_tok, d_tok)):
            if t != d and t is not None and d is not None:
                raise ValueError(f"draft tokenizer differs from the target's: token id {i} is {d!r} in the draft "
                                 f"and {t!r} in the target; speculative decoding needs the same tokenizer")


def prepare_model(model, compile):
    """``mirror_rt.compiled.prepare(model, compile)``: the model's forward, compiled where enabled."""
    from mirror_rt.compiled import prepare

    return prepare(model, compile)


# --- device-side decisions, one read a step ------------------------------------------------------

def all_finite(logits: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: no NaN/inf in logits (stays on the device)."""
    return torch.isfinite(logits).all()


def read_back(*values: torch.Tensor) -> list:
    """The host's one read of a step: 0-d or 1-D device tensors, packed into one int64 tensor and
    read with a single ``tolist``. Returns one int per 0-d value and a list per 1-D value."""
    flat = [v.reshape(-1).to(torch.int64) for v in values]
    host = torch.cat(flat).tolist()
    out, i = [], 0
    for v, f in zip(values, flat):
        n = f.numel()
        out.append(host[i] if v.dim() == 0 else host[i:i + n])
        i += n
    return out


def raise_unless_finite(ok, model_name: str, step: int):
    """ok: the host value of ``all_finite`` read with the step's other values."""
    if not ok:
        raise FloatingPointError(f"{model_name} produced NaN/inf logits at step {step}; refusing to emit tokens")


def check_finite(logits: torch.Tensor, model_name: str, step: int):
    """A separate read of ``all_finite`` (for callers outside a step's one read)."""
    raise_unless_finite(bool(all_finite(logits)), model_name, step)


class Sampler:
    """Token choice from logits: argmax at temperature 0, else a seeded sample of the processed p."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed, device):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed() % (2 ** 63))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return process_logits(logits, self.temperature, self.top_k, self.top_p)

    def uniforms(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.generator.device)

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [..., V] -> (tokens [...] int64 on the device, processed probs [..., V] or None
        when greedy). No host read."""
        if self.greedy:
            return logits.argmax(-1), None
        p = self.probs(logits)
        flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=self.generator)
        return flat.reshape(p.shape[:-1]), p

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """logits [V] -> (token as an int, processed probs or None when greedy): ``draw`` and a read."""
        token, p = self.draw(logits)
        return int(token), p


class Emitter:
    """Collects generated tokens; stops exactly at EOS (kept), after a stop string, or at max_new_tokens.

    eos: a collection of ids; stop: a ``mirror_rt.generation.StopStrings`` or None."""

    def __init__(self, max_new_tokens: int, eos=(), stream=None, stop=None):
        self.limit = max_new_tokens
        self.eos = frozenset(eos)
        self.tokens: list[int] = []
        self.done = max_new_tokens == 0
        self.stream = stream
        self.stop = stop

    def emit(self, toks) -> int:
        """Append tokens in order until done; returns how many were taken."""
        taken = 0
        for t in toks:
            if self.done:
                break
            t = int(t)
            self.tokens.append(t)
            taken += 1
            stopped = self.stop is not None and self.stop.push(t)
            self.done = stopped or t in self.eos or len(self.tokens) >= self.limit
        if self.stream is not None and taken:
            self.stream(self.tokens[-taken:])
        return taken

    @property
    def remaining(self) -> int:
        return self.limit - len(self.tokens)

    def result(self, device) -> torch.Tensor:
        return torch.tensor([self.tokens], dtype=torch.int64, device=device).reshape(1, len(self.tokens))


@dataclass
class Generation:
    """One generate() call's shared state, built by ``start_generation``."""

    prompt: torch.Tensor  # [L] int64 on the target's device
    tokens: list          # committed ids (prompt, then output); the last one is pending
    capacity: int         # cache slots: prompt + max_new_tokens + slack
    cache: object
    sampler: Sampler
    out: Emitter
    stats: Stats
    reuse: object = None  # a decoders.reuse.PrefixReuse shared with the next generation, or None

    def prefill_target(self, model):
        """The target's prefill of the prompt, from the rows ``reuse`` holds for its first tokens
        (copied into the cache) on: only the rest is fed."""
        reused = self.reuse.restore(self.cache, self.tokens) if self.reuse is not None else 0
        prefill(model, self.cache, self.prompt[reused:])
        if reused:
            self.stats.counters["prefill_reused"] += reused

    def output(self, device, **extra) -> GenerationOutput:
        if self.reuse is not None:
            self.reuse.keep(self.tokens, self.cache)
        return GenerationOutput(self.out.result(device), self.stats.finish(len(self.out.tokens), **extra))


def start_generation(target, input_ids, args: GenerateArgs, name: str, slack: int, draft=None,
                     reuse=None) -> Generation:
    """The set-up every decoder shares: argument and prompt checks, cache capacity (the draft's
    context too), the target's cache, sampler, emitter (EOS, stop strings, stream) and stats.
    target: the decoder's prepared target (its ``new_cache`` rounds a compiled cache's capacity,
    so prompts of different lengths share compiled artifacts). reuse: the decoder's PrefixReuse
    or None."""
    args.check()  # the target itself was checked when the decoder was built (check_model / check_pair)
    from mirror_rt.generation import StopStrings, resolve_eos

    prompt = as_prompt(input_ids, target.config.vocab_size, target.device)
    capacity = check_context(target, prompt.numel(), args.max_new_tokens, slack)
    if draft is not None:
        check_context(draft, prompt.numel(), args.max_new_tokens, slack)
    stop = None if args.stop is None else StopStrings(args.stop, args.tokenizer)
    out = Emitter(args.max_new_tokens, resolve_eos(target, _in_vocabulary(args.eos_token_id, target)), args.stream,
                  stop)
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed, target.device)
    return Generation(prompt, prompt.tolist(), capacity, target.new_cache(capacity), sampler, out, Stats(name), reuse)


def _in_vocabulary(eos_token_id, model):
    """A list of EOS ids without those past the vocabulary (a tokenizer's extra ids: never generated)."""
    if isinstance(eos_token_id, (list, tuple)):
        return [t for t in eos_token_id if not isinstance(t, int) or t < model.config.vocab_size]
    return eos_token_id


@torch.inference_mode()
def prefill(model, cache, prompt: torch.Tensor):
    """Feed all prompt tokens but the last into the cache and commit them. The last prompt token
    is the first *pending* token: every decoder's first step feeds it (so a 1-token prompt
    needs no prefill). The LM head is skipped: no logits are needed here."""
    if prompt.numel() > 1:
        model.run_layers(model.embed(prompt[None, :-1]), 0, model.num_layers, cache)
        cache.commit(prompt.numel() - 1)

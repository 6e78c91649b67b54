"""Mirror-SD's configuration: the algorithm only (where it runs is ``mirror_rt.placement.Placement``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from mirror_rt import defaults
from mirror_rt.decoders.base import MODES, check_window
from mirror_rt.decoders.drafting import check_min_draft_prob
from mirror_rt.decoders.lookup import check_lookup, check_lookup_window

POLICIES = ("per_position", "ranked")
FALLBACKS = ("recompute", "exit")
PLANS = ("auto", "fixed")
EXIT_VOCABS = ("draft", "full")
PLACEMENT_FIELDS = ("lane", "draft_threads", "lane_timeout")  # accepted here for one release, with a warning
DRAFT_SHORTCUTS = {"lookup": "lookup", "lookup_window": "lookup_window", "min_draft_prob": "min_prob",
                   "min_branch_prob": "min_branch_prob", "max_branches": "max_branches", "exit_vocab": "exit_vocab"}


@dataclass(slots=True)
class LogitLens:
    """The exit head that is no head: the target's own final norm and LM head at layer
    ``exit_layer`` (None: half the target's layers)."""

    exit_layer: int | None = None


class ExitAt:
    """A callable exit head (hidden [1, T, H] -> logits [1, T, V]) bound to the layer it reads."""

    def __init__(self, head, exit_layer: int | None):
        self.head, self.exit_layer = head, exit_layer

    def __call__(self, hidden):
        return self.head(hidden)

    def __getattr__(self, name):  # e.g. ``normed``, so that the exit can restrict the vocabulary
        if name in ("head", "exit_layer"):
            raise AttributeError(name)
        return getattr(self.head, name)


@dataclass(slots=True)
class DraftOptions:
    """How much work the draft does each step (none of it changes a token).

    lookup           context lookup's longest n-gram, tried before the draft (greedy only; 0: off)
    lookup_window    tokens a copied window may hold (None: the config's window)
    min_prob         a draft window ends before its first token the draft gives less than this (0: full)
    min_branch_prob  ranked branches the exit head puts below this probability are not rolled out
    max_branches     cap on branches per step (None: as many as fit one rollout tree)
    exit_vocab       "draft": the exit scores only a reduced-vocabulary draft's ids; "full"
    """

    lookup: int = 0
    lookup_window: int | None = None
    min_prob: float = 0.0
    min_branch_prob: float = defaults.MIN_BRANCH_PROB
    max_branches: int | None = None
    exit_vocab: str = defaults.EXIT_VOCAB

    def validate(self, window: int) -> "DraftOptions":
        check_lookup(self.lookup)
        self.lookup_window = check_lookup_window(self.lookup_window, window, defaults.MAX_WINDOW)
        self.min_prob = check_min_draft_prob(self.min_prob)
        if isinstance(self.min_branch_prob, bool) or not isinstance(self.min_branch_prob, (int, float)) \
                or not 0 <= self.min_branch_prob < 1:
            raise ValueError(f"min_branch_prob must be in [0, 1), got {self.min_branch_prob!r}")
        if self.max_branches is not None and (not isinstance(self.max_branches, int) or self.max_branches < 0):
            raise ValueError(f"max_branches must be None or an integer >= 0, got {self.max_branches!r}")
        if self.exit_vocab not in EXIT_VOCABS:
            raise ValueError(f"exit_vocab must be 'draft' or 'full', got {self.exit_vocab!r}")
        return self


@dataclass(init=False)
class MirrorConfig:
    """Mirror-SD's algorithm (DESIGN.md §1, §6); every default comes from ``mirror_rt.defaults``.

    exit_head      the early exit at layer l_e: an ``ExitHead`` (it knows its layer), any callable
                   hidden [1, T, H] -> logits [1, T, V] (give ``exit_layer=``), or None for the logit
                   lens; ``exit_layer=`` alone picks the lens's layer (default: half the layers)
    kappa          exit candidates per position (ranked: a budget of (window + 1) * kappa branches)
    window         gamma: draft tokens per window and rollout depth, 1..32
    branch_policy  "ranked" (by estimated P(A = i, c = v)) or "per_position" (top-kappa at each i)
    fallback       after a miss: "exit" starts the next step at once with an empty window whose exit
                   branches give the draft its next window; "recompute" (the paper) waits for a
                   fresh window from the draft
    mode           the acceptance rule when sampling (temperature 0 is always greedy, exact argmax):
                   "rejection" accepts w_i with probability min(1, p/q) and resamples from the
                   residual; it needs the draft's q rows (one [window, V] tensor per window) and keeps
                   windows alive at temperature 1. "match" draws the target's token and accepts
                   w_i only if it is that token: no q rows, but a sampled draft token rarely equals
                   an independent sample, so at temperature 1 almost nothing is accepted. Both keep
                   the target's distribution exactly.
    plan           "auto": a planner picks window, kappa, branches and overlap per step from measured
                   phase times (DESIGN.md §6), so a seeded sampled output may vary from run to run (its
                   distribution never does; greedy output never varies); "fixed": the values above
                   every step, and a seed always gives the same tokens
    draft          ``DraftOptions`` (lookup, draft confidence cut, branch floor and cap, exit vocabulary);
                   their names are also accepted here as keywords

    ``top_k=`` (the old name of kappa) and the placement fields ``lane``, ``draft_threads``,
    ``lane_timeout`` still work for one release, with a DeprecationWarning.
    """

    exit_head: object
    kappa: int
    window: int
    branch_policy: str
    fallback: str
    mode: str
    plan: str
    draft: DraftOptions

    def __init__(self, exit_layer=None, exit_head=None, kappa=defaults.KAPPA, window=defaults.WINDOW,
                 branch_policy=defaults.BRANCH_POLICY, fallback=defaults.FALLBACK, mode=defaults.MODE,
                 plan=defaults.PLAN, draft=None, *, top_k=None, **shortcuts):
        if top_k is not None:
            warnings.warn("MirrorConfig(top_k=) is now kappa=", DeprecationWarning, stacklevel=2)
            kappa = top_k
        unknown = set(shortcuts) - set(DRAFT_SHORTCUTS) - set(PLACEMENT_FIELDS)
        if unknown:
            raise TypeError(f"MirrorConfig got unexpected keyword(s) {sorted(unknown)}")
        self.legacy_placement = {k: shortcuts.pop(k) for k in PLACEMENT_FIELDS if k in shortcuts}
        if self.legacy_placement:
            warnings.warn(f"MirrorConfig({', '.join(self.legacy_placement)}=) moved to "
                          "mirror_rt.placement.Placement", DeprecationWarning, stacklevel=2)
        draft = DraftOptions() if draft is None else draft
        for name, value in shortcuts.items():
            setattr(draft, DRAFT_SHORTCUTS[name], value)
        self.exit_head = _bind_exit(exit_head, exit_layer)
        self.kappa, self.window, self.branch_policy = kappa, window, branch_policy
        self.fallback, self.mode, self.plan, self.draft = fallback, mode, plan, draft

    @property
    def exit_layer(self) -> int | None:
        return self.exit_head.exit_layer

    @property
    def max_branches(self) -> int | None:  # read by the planner's fixed plan
        return self.draft.max_branches

    @property
    def min_branch_prob(self) -> float:
        return self.draft.min_branch_prob

    @property
    def top_k(self) -> int:
        warnings.warn("MirrorConfig.top_k is now kappa", DeprecationWarning, stacklevel=2)
        return self.kappa

    @property
    def trained_exit(self) -> bool:
        """Whether the exit is a head of its own (False: the logit lens)."""
        return not isinstance(self.exit_head, LogitLens)

    def validate(self, num_layers: int) -> "MirrorConfig":
        if self.exit_head.exit_layer is None:
            self.exit_head.exit_layer = num_layers // 2
        layer = self.exit_head.exit_layer
        if not isinstance(layer, int) or not 1 <= layer <= num_layers - 1:
            raise ValueError(f"exit_layer must be an integer in [1, {num_layers - 1}], got {layer!r}")
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, int) or not 1 <= self.kappa <= 64:
            raise ValueError(f"kappa must be an integer in [1, 64], got {self.kappa!r}")
        self.window = check_window(self.window, "window (gamma)")
        if self.branch_policy not in POLICIES:
            raise ValueError(f"branch_policy must be one of {POLICIES}, got {self.branch_policy!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        if not isinstance(self.draft, DraftOptions):
            raise TypeError(f"draft must be a DraftOptions, got {type(self.draft).__name__}")
        self.draft.validate(self.window)
        return self


def _bind_exit(head, exit_layer):
    """The exit head as an object that knows its layer (see MirrorConfig.exit_head)."""
    if head is None or isinstance(head, LogitLens):
        return LogitLens(exit_layer if head is None else head.exit_layer if exit_layer is None else exit_layer)
    if not callable(head):
        raise TypeError("exit_head must be callable: hidden [1, T, H] -> logits [1, T, V]")
    own = getattr(head, "exit_layer", None)
    if own is None:
        return ExitAt(head, exit_layer)
    if exit_layer is not None and exit_layer != own:
        raise ValueError(f"exit_layer {exit_layer} differs from the exit head's layer {own}")
    return head

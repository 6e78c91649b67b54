"""Test doubles for Mirror-SD lanes: drafts that are slow, fail, or hang (picklable, so the
process lane can build them in its child)."""
from __future__ import annotations

import time

import torch

from mirror_rt.models.derive import ModelWrapper, random_model


class DraftWrapper(ModelWrapper):
    """Delegates to a model; subclasses hook every forward (run_layers)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.name = f"wrapped({inner.name})"
        self.calls = 0

    def run_layers(self, *args, **kwargs):
        self.calls += 1
        self.hook()
        return super().run_layers(*args, **kwargs)

    def hook(self):
        pass


class SlowDraft(DraftWrapper):
    def __init__(self, inner, seconds):
        super().__init__(inner)
        self.seconds = seconds

    def hook(self):
        time.sleep(self.seconds)  # releases the GIL, like a real device would


class FailingDraft(DraftWrapper):
    """Raises (or hangs, or returns NaN) after `after` forwards."""

    def __init__(self, inner, after, how="raise"):
        super().__init__(inner)
        self.after, self.how = after, how

    def hook(self):
        if self.calls > self.after:
            if self.how == "raise":
                raise RuntimeError("injected draft failure")
            if self.how == "hang":
                time.sleep(3600)

    def head(self, h):
        logits = self.inner.head(h)
        if self.how == "nan" and self.calls > self.after:
            logits = logits + float("nan")
        return logits


class SlowTarget(DraftWrapper):
    """A target whose layers take a fixed time (the suffix then has a known duration)."""

    def __init__(self, inner, seconds):
        super().__init__(inner)
        self.seconds = seconds

    def hook(self):
        time.sleep(self.seconds)


def tiny_pair(vocab=64, layers=4, seed=0):
    target = random_model(seed, vocab_size=vocab, num_layers=layers)
    draft = random_model(seed + 1, vocab_size=vocab, num_layers=1)
    return target, draft


def identity_last_layer(model):
    """Zero the last layer's output projections: it becomes the identity, so the logit lens at
    layer N-1 equals the final logits (an exit head that is 'the final layer itself')."""
    last = model.layers[-1]
    with torch.no_grad():
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    return model


class ThreadCounting(DraftWrapper):
    """Records torch's intra-op thread count of the calling thread at every forward (threads), and
    the first layer each forward ran (starts)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.threads, self.starts = [], []

    def run_layers(self, hidden, start, *args, **kwargs):
        self.starts.append(start)
        return super().run_layers(hidden, start, *args, **kwargs)

    def hook(self):
        self.threads.append(torch.get_num_threads())

"""Spec-Bench questions and the one train/evaluation split of them (offline; never a hub download).

A question file is Spec-Bench's ``question.jsonl``: one JSON object per line with ``question_id``,
``category`` and ``turns`` (``turns[0]`` is the user message). The split is by id:
**evaluation** = ``(question_id // 2) % 2 == 0``, **train-allowed** = the rest. ``is_eval_question``
is its one definition: training (``mirror_rt.train``) only ever sees ``train_questions``, and the
probe, the demo and ``mirror-rt bench`` evaluate on ``eval_questions``. Being by id, the split
holds for any subset of the file and for the other half of Spec-Bench.
"""
from __future__ import annotations

import json
import os

SPEC_BENCH_ENV = "MIRROR_RT_SPEC_BENCH"
SPEC_BENCH_DEFAULT = "/work/shared/data/spec_bench/question.jsonl"


def is_eval_question(question_id: int) -> bool:
    """The split: evaluation prompts are those with (question_id // 2) % 2 == 0."""
    return (int(question_id) // 2) % 2 == 0


def spec_bench_path(path: str | None = None) -> str:
    """``path``, else ``$MIRROR_RT_SPEC_BENCH``, else the shared dev half; FileNotFoundError if absent."""
    path = path or os.environ.get(SPEC_BENCH_ENV) or SPEC_BENCH_DEFAULT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Spec-Bench question file {path!r} not found (set {SPEC_BENCH_ENV} or pass a path)")
    return path


def load_questions(path: str | None = None) -> list[dict]:
    """Every question of the file (dicts with question_id, category, turns), in file order."""
    with open(spec_bench_path(path)) as f:
        out = [json.loads(line) for line in f if line.strip()]
    for q in out:
        if "question_id" not in q or not q.get("turns"):
            raise ValueError(f"Spec-Bench entry without question_id/turns: {str(q)[:80]}")
    return out


def train_questions(path: str | None = None) -> list[dict]:
    """The train-allowed side of the split."""
    return [q for q in load_questions(path) if not is_eval_question(q["question_id"])]


def eval_questions(path: str | None = None) -> list[dict]:
    """The evaluation side of the split: questions no training of ours has seen."""
    return [q for q in load_questions(path) if is_eval_question(q["question_id"])]


def spread(items: list, n: int) -> list:
    """n items taken evenly across the list, in order (all of them when n >= len): Spec-Bench files
    are grouped by category, so the first n would all come from the first family."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(max(n, 0))]


def first_turns(questions: list[dict]) -> list[str]:
    """Each question's first user message."""
    return [q["turns"][0] for q in questions]

"""Spec-Bench runner end to end on tiny random models with a fake tokenizer (no transformers)."""
import csv
import json

import pytest
import torch

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder
from mirror_rt.models.derive import random_model, truncated_copy
from mirror_rt.specbench import load_questions, run_specbench, summarize, task_family
from mirror_rt.specbench_report import accept_lengths, format_table, plot_speedups, write_answers, write_csv

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["write a poem", "again"]},
    {"question_id": 2, "category": "qa", "turns": ["who is it?"]},
    {"question_id": 3, "category": "qa", "turns": ["where is it and why is it there?"]},
]


def fake_encode(text):
    """Characters to ids in a 64-token vocabulary: a tokenizer stand-in."""
    return torch.tensor([[ord(c) % 64 for c in text]], dtype=torch.int64)


@pytest.fixture
def qfile(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_load_questions_families_and_limit(qfile):
    assert task_family("writing") == "mt_bench" and task_family("qa") == "qa"
    assert [q["question_id"] for q in load_questions(qfile)] == [1, 2, 3]
    assert [q["question_id"] for q in load_questions(qfile, limit=1)] == [1, 2]  # per family
    assert [q["question_id"] for q in load_questions(qfile, categories=["mt_bench"])] == [1]
    assert [q["question_id"] for q in load_questions(qfile, categories=["writing"])] == [1]
    # The eval split (never trained on) and its complement partition the file.
    assert [q["question_id"] for q in load_questions(qfile, split="eval")] == [1]
    assert [q["question_id"] for q in load_questions(qfile, split="train")] == [2, 3]
    with pytest.raises(ValueError):
        load_questions(qfile, categories=["rag"])


def test_specbench_end_to_end(qfile, tmp_path):
    target = random_model(seed=0, num_layers=4, max_position=64)
    draft = truncated_copy(target, 1)
    decoders = {"ar": AutoregressiveDecoder(target), "sd": SpeculativeDecoder(target, draft, 3),
                "mirror": MirrorDecoder(target, draft, MirrorConfig(kappa=2, window=3), Placement(lane="inline"))}
    questions = load_questions(qfile) + [{"question_id": 4, "category": "rag", "turns": ["x" * 60]}]
    result = run_specbench(questions, fake_encode, decoders, context=64, max_new_tokens=12, progress=False)
    assert result["skipped"] == [4]  # 60 prompt tokens + 12 new exceed the 64-token context
    rows = summarize(result, greedy=True)
    assert [r["family"] for r in rows[::3]] == ["mt_bench", "qa", "overall"]
    for r in rows:
        assert r["equal_ar"] is True, r
        assert r["tok_s"] > 0 and r["speedup"] > 0 and r["pred_tok_s"] > 0
    assert all(r["speedup"] == 1.0 for r in rows if r["decoder"] == "ar")
    mirror = [r for r in rows if r["decoder"] == "mirror"]
    assert all(0 <= r["reuse_rate"] <= 1 and r["fallback_rate"] != "" for r in mirror)
    assert rows[-1]["prompts"] == 3

    out = tmp_path / "out"
    paths = write_answers(result, str(out), "tiny", lambda ids: " ".join(map(str, ids)))
    answers = [json.loads(line) for line in open(paths["mirror"])]
    assert [a["question_id"] for a in answers] == [1, 2, 3]
    choice = answers[0]["choices"][0]
    assert set(answers[0]) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
    assert set(choice) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
    assert choice["new_tokens"] == [12] and len(choice["accept_lengths"]) == choice["decoding_steps"][0]
    assert sum(choice["accept_lengths"]) >= 12  # tokens committed per step cover the output

    csv_path = write_csv(rows, str(out / "specbench.csv"), {"device": "cpu"})
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    png = plot_speedups(rows, str(out / "specbench.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "mirror" in format_table(rows)
    decoders["mirror"].close()


def test_accept_lengths_from_histogram():
    assert accept_lengths({"accepted_hist": {0: 2, 3: 1}}) == [1, 1, 4]
    assert accept_lengths({"accepted_hist": {"1": 1}}) == [2]  # keys survive a JSON round trip


def test_build_decoders_puts_ar_first_and_takes_factories(tmp_path, monkeypatch):
    import argparse

    from mirror_rt.bench_cli import build_decoders

    (tmp_path / "my_decoders.py").write_text(
        "from mirror_rt.decoders import SpeculativeDecoder\n"
        "def sd3(target, draft, args):\n    return SpeculativeDecoder(target, draft, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = random_model(seed=0, num_layers=2)
    args = argparse.Namespace(window=None, kappa=None, exit_layer=None, mode="match", max_branches=None, lane="inline")
    decoders = build_decoders(["sd", "my_decoders:sd3"], target, truncated_copy(target, 1), args)
    assert list(decoders) == ["ar", "sd", "sd3"] and decoders["sd3"].window == 3
    with pytest.raises(ValueError):
        build_decoders(["nope"], target, target, args)


def test_summary_takes_records_whose_stats_differ(qfile):
    """A decoder whose stats change shape between prompts (the auto decoder reports the stats of
    the decoder it chose) still gets its row: missing counters count as zero."""
    target = random_model(seed=0, num_layers=4, max_position=64)
    draft = truncated_copy(target, 1)
    decoders = {"ar": AutoregressiveDecoder(target),
                "mirror": MirrorDecoder(target, draft, MirrorConfig(kappa=2, window=3), Placement(lane="inline"))}
    result = run_specbench(load_questions(qfile), fake_encode, decoders, context=64, max_new_tokens=8, progress=False)
    mixed = result["runs"]["mirror"]
    mixed[1] = {**mixed[1], "stats": result["runs"]["ar"][1]["stats"]}  # this prompt "chose" AR
    rows = summarize(result, greedy=True)
    overall = [r for r in rows if r["decoder"] == "mirror" and r["family"] == "overall"][0]
    assert overall["tok_s"] > 0 and 0 <= overall["reuse_rate"] <= 1 and overall["fallback_rate"] != ""

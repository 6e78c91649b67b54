"""probe: its numbers equal a direct computation on a tiny random model; the prompt split."""
import torch

from mirror_rt import prompts as Q
from mirror_rt.answers import generate_answers
from mirror_rt.models.derive import random_model, truncated_copy
from mirror_rt.probe import format_table, run_probe, write_csv, write_png
from mirror_rt.train import data as D


def _direct_layer_logits(model, ids):
    """Per-layer logit lens, one layer at a time: {layer: logits [T, V]}, final logits."""
    cache = model.new_cache(ids.shape[1])
    h = model.embed(ids)
    out = {}
    for layer in range(model.num_layers):
        h = model.run_layers(h, layer, layer + 1, cache)
        out[layer + 1] = model.lm_head(model.norm(h))[0].float()
    return out, out[model.num_layers]


@torch.inference_mode()
def test_probe_equals_direct_computation(tmp_path):
    target = random_model(3, vocab_size=40, num_layers=4, tie_embeddings=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (3, 6, 4)]
    answers = generate_answers(target, prompts, 10, [], use_hf=False)
    draft = truncated_copy(target, 2)
    res = run_probe(target, prompts, answers, layers=[1, 2, 3], kappas=(1, 2, 4), draft=draft, window=3)
    # direct: containment / Omega at answer-predicting positions, and at draft-rejection positions
    hit = {l: {k: [] for k in (1, 2, 4)} for l in (1, 2, 3)}
    om = {l: {k: [] for k in (1, 2, 4)} for l in (1, 2, 3)}
    rej_hit = {l: {k: [] for k in (1, 2, 4)} for l in (1, 2, 3)}
    for p, a in zip(prompts, answers):
        per_layer, final = _direct_layer_logits(target, torch.tensor([p + a]))
        positions = range(len(p) - 1, len(p) - 1 + len(a))
        rejected = _rejections(draft, p, a, 3)
        for l in (1, 2, 3):
            for k in (1, 2, 4):
                for i, pos in enumerate(positions):
                    f = int(final[pos].argmax())
                    top = torch.topk(per_layer[l][pos], k).indices.tolist()
                    hit[l][k].append(f in top)
                    om[l][k].append(float(torch.softmax(final[pos], -1)[top].sum()))
                    if i in rejected:
                        rej_hit[l][k].append(f in top)
    for l in (1, 2, 3):
        for k in (1, 2, 4):
            assert abs(res.value(f"layer {l}", "all", k) - sum(hit[l][k]) / len(hit[l][k])) < 1e-6
            assert abs(res.value(f"layer {l}", "all", k, "omega") - sum(om[l][k]) / len(om[l][k])) < 1e-5
            assert res.rows[f"layer {l}"]["rejected"]["n"] == len(rej_hit[l][k])
            assert abs(res.value(f"layer {l}", "rejected", k) - sum(rej_hit[l][k]) / max(len(rej_hit[l][k]), 1)) < 1e-6
    assert "layer 3" in format_table(res)
    write_csv(res, str(tmp_path / "p.csv"))
    write_png(res, str(tmp_path / "p.png"), "test")
    assert (tmp_path / "p.csv").read_text().count("\n") == 1 + 3 * 2 * 3
    assert (tmp_path / "p.png").stat().st_size > 1000


def _rejections(draft, prompt, answer, window):
    """Greedy chain SD by hand: answer indices where the target corrected the draft."""
    out, p = set(), 0
    while p < len(answer):
        ctx = prompt + answer[:p]
        cache = draft.new_cache(64)
        prop = []
        logits = draft(torch.tensor([ctx]), cache)[0, -1]
        cache.commit(len(ctx))
        for _ in range(window):
            t = int(logits.argmax())
            prop.append(t)
            logits = draft(torch.tensor([[t]]), cache)[0, -1]
            cache.commit(1)
        a = 0
        while a < window and p + a < len(answer) and prop[a] == answer[p + a]:
            a += 1
        a = min(a, len(answer) - 1 - p)
        if a < window:
            out.add(p + a)
        p += a + 1
    return out


def test_prompt_split_is_disjoint_and_documented(tmp_path):
    import json

    qs = [{"question_id": i, "category": "x", "turns": [f"q{i}"]} for i in range(80, 100)]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(q) for q in qs))
    train, ev = Q.train_questions(str(f)), Q.eval_questions(str(f))
    assert {q["question_id"] for q in ev} == {i for i in range(80, 100) if (i // 2) % 2 == 0}
    assert not {q["question_id"] for q in train} & {q["question_id"] for q in ev}
    assert len(train) + len(ev) == len(qs)
    prompts = D.training_prompts(5, spec_bench=str(f))
    assert not set(prompts) & set(Q.first_turns(ev))
    assert D.template_prompts(5, seed=1) == D.template_prompts(5, seed=1)
    many = D.template_prompts(2000, seed=0)
    assert len(many) == len(set(many)) == 2000  # distinct: a repeated prompt adds no data
    assert len(D.pydoc_paragraphs()) > 100


def test_cli_registers_commands():
    from mirror_rt.cli import build_parser

    p = build_parser()
    for cmd in ("probe", "train-exit", "train-draft"):
        assert p.parse_args([cmd]).func is not None


def test_batched_transformers_answers_equal_our_runner():
    target = random_model(0, vocab_size=64, tie_embeddings=True, rope_theta=100000.0)
    prompts = [[1, 2, 3], [4, 5], [9, 8, 7, 6, 5]]
    hf = generate_answers(target, prompts, 6, [2], batch_size=2, use_hf=True)
    assert hf == generate_answers(target, prompts, 6, [2], use_hf=False)
    cut = generate_answers(target, prompts, 6, [2], batch_size=1, use_hf=True, time_limit=1e-9)
    assert cut.count(None) == 3


def test_gpu_bundle_reassembles_the_target(tmp_path, monkeypatch):
    import hashlib
    import json

    from mirror_rt.train import gpu_train

    blob = bytes(range(256)) * 40
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "target.part0").write_bytes(blob[:3000])
    (tmp_path / "b" / "target.part1").write_bytes(blob[3000:])
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({
        "gguf_name": "t.gguf", "gguf_sha256": hashlib.sha256(blob).hexdigest(), "gguf_bytes": len(blob),
        "parts": {"a/target.part0": 3000, "b/target.part1": len(blob) - 3000}}))
    stash = tmp_path / "stash"
    monkeypatch.setattr(gpu_train, "STASH", str(stash))
    stash.mkdir()
    (stash / "target.part0").write_bytes(blob[:3000])  # part 0 stashed by an earlier call
    (tmp_path / "a" / "target.part0").unlink()
    out = gpu_train.assemble(str(tmp_path))
    assert open(out, "rb").read() == blob


def test_spread_takes_prompts_across_the_families():
    rows = [f"{fam}{i}" for fam in "abcd" for i in range(5)]  # grouped by family, like Spec-Bench
    assert Q.spread(rows, 4) == ["a0", "b0", "c0", "d0"]
    assert Q.spread(rows, 8) == ["a0", "a2", "b0", "b2", "c0", "c2", "d0", "d2"]
    assert Q.spread(rows, 50) == rows and Q.spread(rows, 0) == []

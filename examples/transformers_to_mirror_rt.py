"""An existing transformers program, switched to mirror_rt in a few lines.

The transformers program (greedy, a stop string, text streamed to the terminal):

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False, stop_strings=stop, tokenizer=tok,
                         streamer=TextStreamer(tok, skip_prompt=True))

The same with mirror_rt, on the SAME loaded model (its weights are shared, not copied):

    target = mirror_rt.load_model(model)                      # our runner on model's tensors
    draft = truncated_copy(target, 1)                         # or a trained draft (load_model(path))
    decoder = mirror_rt.SpeculativeDecoder(target, draft)     # or MirrorDecoder(target, draft)
    out = decoder.generate(ids, 40, stop=stop, tokenizer=tok, stream=TextStreamer(tok))

EOS comes from the model's config as in transformers; the output is the same tokens.

    python examples/transformers_to_mirror_rt.py            # a tiny random model saved to a temp folder
    python examples/transformers_to_mirror_rt.py --model DIR [--prompt TEXT] [--stop TEXT]
    python examples/transformers_to_mirror_rt.py --default   # the embedded SmolLM2-135M-Instruct (GGUF)
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch


TEXT = ["The quick brown fox jumps over the lazy dog.", "Mirror speculative decoding runs the draft beside the target."]


def save_tiny_model(folder: str) -> None:
    """A tiny random Llama and a byte-level BPE tokenizer trained on two sentences, saved as a
    Hugging Face checkpoint (no download): a stand-in for a real checkpoint directory. The
    tokenizer knows only the sentences' characters, so whatever the model says is readable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 9, trainers.BpeTrainer(vocab_size=120, special_tokens=["<eos>"],
                                                          show_progress=False))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init, so the text varies
        for p in model.parameters():
            p.normal_(0, 0.4 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint directory (default: a tiny random model)")
    parser.add_argument("--default", action="store_true",
                        help="the embedded SmolLM2-135M-Instruct GGUF, with our trained draft for it")
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--stop", default=None, help="stop string (default: one the tiny model will say)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--decoder", default="sd", choices=["ar", "sd", "mirror"])
    args = parser.parse_args(argv)
    gguf = {}
    if args.default:
        import os

        from mirror_rt.default import default_target_path

        folder, gguf = os.path.split(default_target_path())
        gguf = {"gguf_file": gguf}
    else:
        folder = args.model or tempfile.mkdtemp(prefix="tiny-llama-")
        if not args.model:
            save_tiny_model(folder)

    # --- the transformers program, unchanged --------------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf).eval()
    tok = AutoTokenizer.from_pretrained(folder, **gguf)
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    stop = args.stop
    if stop is None:  # a random model says nothing predictable: end at its 6th token
        said = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        stop = tok.decode(said[-2:])
    print(f"stop string: {stop!r}\n--- transformers ---")
    hf_out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, stop_strings=[stop],
                            tokenizer=tok, streamer=TextStreamer(tok, skip_prompt=True))
    hf_new = hf_out[0, ids.shape[1]:].tolist()

    # --- the same with mirror_rt: four lines ----------------------------------------------------
    import mirror_rt
    from mirror_rt.generation import TextStreamer as MirrorTextStreamer
    from mirror_rt.models.derive import truncated_copy

    target = mirror_rt.load_model(model)  # shares model's weight tensors
    if args.default:  # the draft we trained for this target
        from mirror_rt.default import load_default_draft

        draft = load_default_draft(target)[0]
    else:
        draft = truncated_copy(target, 1)
    decoder = {"ar": lambda: mirror_rt.AutoregressiveDecoder(target),
               "sd": lambda: mirror_rt.SpeculativeDecoder(target, draft),
               "mirror": lambda: mirror_rt.MirrorDecoder(target, draft)}[args.decoder]()
    print(f"--- mirror_rt ({args.decoder}) ---")
    streamer = MirrorTextStreamer(tok)
    out = decoder.generate(ids, args.max_new_tokens, stop=[stop], tokenizer=tok, stream=streamer)
    streamer.end()
    print()
    if hasattr(decoder, "close"):
        decoder.close()

    ours = out.tokens[0].tolist()
    same = ours == hf_new
    print(f"{len(ours)} tokens, mean accepted {out.stats['mean_accepted']:.2f}; "
          f"{'the same tokens as transformers' if same else 'DIFFERENT from transformers'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizers for a checkpoint directory (transformers' AutoTokenizer) or a GGUF file.

A GGUF file carries its tokenizer as metadata (tokens, merges, token types, special ids, chat
template). transformers rebuilds it through its converter, which costs seconds at every start
(bench/RESULTS.md, start-up). Here a byte-level BPE vocabulary with a plain GPT-2 split (the
embedded default's) is built directly with ``tokenizers`` from the file's own lists, the same
tokenizer the converter makes (tests/test_tokenizer.py compares ids on a mixed corpus); any other
GGUF tokenizer goes through transformers' converter once and is cached on disk
(``mirror_rt.tokenizer_cache``). Either way the result is a ``FastTokenizer``: the part of
transformers' tokenizer API this package uses, without importing transformers.
"""
from __future__ import annotations

import functools
import os
import re

# GGUF pre-tokenizer names that transformers' converter leaves on the GPT-2 byte-level split
# (no entry in its split table); only these are built directly. Others (llama3, qwen2, ...) use
# their own split regex and go through the converter.
DIRECT_PRE_TOKENIZERS = frozenset({"smollm", "gpt-2"})
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                     "pad_token": "padding_token_id"}


def load_tokenizer(source):
    """The tokenizer of a Hugging Face directory (AutoTokenizer) or of a .gguf file (FastTokenizer)."""
    source = os.fspath(source)
    if source.endswith(".gguf"):
        return gguf_tokenizer(source)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("tokenizers need transformers: pip install 'mirror_rt[hf]'") from None
    return AutoTokenizer.from_pretrained(source)


def gguf_tokenizer(path) -> "FastTokenizer":
    """The tokenizer a GGUF file describes: built directly where ``direct_build_supported`` says so,
    else converted by transformers (cached on disk: mirror_rt.tokenizer_cache)."""
    from mirror_rt.models.gguf_header import forget_gguf_headers, read_gguf_header

    path = os.fspath(path)
    meta = read_gguf_header(path).metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    if direct_build_supported(meta):
        tokenizer = FastTokenizer(build_byte_level(meta), gguf_special_tokens(meta), meta.get("tokenizer.chat_template"))
    else:
        from mirror_rt.tokenizer_cache import cached_conversion

        tokenizer = cached_conversion(path)
    # Models load before their tokenizer (the loader has read this header already): nothing is to
    # read it again, and its token and merge strings (~8 MB for 49k) would stay for the whole run.
    forget_gguf_headers()
    return tokenizer


def direct_build_supported(meta: dict) -> bool:
    return (meta.get("tokenizer.ggml.model") == "gpt2" and meta.get("tokenizer.ggml.pre") in DIRECT_PRE_TOKENIZERS
            and "tokenizer.ggml.merges" in meta and not meta.get("tokenizer.ggml.add_bos_token")
            and not meta.get("tokenizer.ggml.add_eos_token"))


def gguf_special_tokens(meta: dict) -> dict:
    """{"bos_token": str | None, ...} from the file's special ids."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in _GGUF_SPECIAL_IDS.items()}
    return {name: tokens[i] if i is not None and 0 <= i < len(tokens) else None for name, i in ids.items()}


def build_byte_level(meta: dict):
    """A ``tokenizers.Tokenizer`` for a GGUF byte-level BPE vocabulary, made the way transformers'
    GGUF converter makes it (GPT2Tokenizer's BPE and byte-level split; control tokens special,
    user-defined ones added; no BOS/EOS added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    outside = re.compile("[^" + re.escape("".join(sorted(spelled))) + "]").search  # one C scan per token
    vocab = {tok if not outside(tok) else "".join(alphabet[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    # Each merge's halves as the vocabulary's own strings: new ones (~100k, ~5 MB) would live only
    # until BPE has copied them (peak memory). A half outside the vocabulary stays as it is.
    own = dict(zip(vocab, vocab))
    merges = [tuple(map(own.get, halves, halves)) for halves in (m.split(" ") for m in meta["tokenizer.ggml.merges"])]
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; the converter skips it.
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= spelled])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    tk.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return tk


@functools.cache
def _byte_alphabet() -> dict:
    """GPT-2's byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the part of transformers' tokenizer API this package uses
    (``__call__``, ``encode``, ``decode``, ``apply_chat_template``, special tokens). Anything else:
    ``to_transformers()`` gives the same tokenizer as a ``PreTrainedTokenizerFast``.

    backend: tokenizers.Tokenizer; special: {"bos_token": str | None, "eos_token", "unk_token",
    "pad_token"}; chat_template: a Jinja template string or None.
    """

    def __init__(self, backend, special: dict, chat_template: str | None = None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        for name in SPECIAL_NAMES:
            token = special.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token) if token is not None else None)
        self._transformers = None

    @property
    def special_tokens_map(self) -> dict:
        return {name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, once each, as transformers lists them for a GGUF tokenizer (the
        other control tokens are special to ``decode(skip_special_tokens=True)`` but not listed)."""
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend_tokenizer.token_to_id(t) for t in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        """{"input_ids", "attention_mask"} for a string (lists) or a list of strings (lists of lists);
        other options (padding, return_tensors, ...) go to ``to_transformers()``."""
        if kwargs:
            return self.to_transformers()(text, add_special_tokens=add_special_tokens, **kwargs)
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        encs = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs]}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """ids: an int, a list of ints, or a 0-d/1-d tensor or array."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = False, chat_template: str | None = None, **kwargs):
        """The conversation (a list of {"role", "content"} dicts) in the chat template: the text, or
        its ids (``tokenize``; a dict with ``return_dict``). Options beyond these (tools, documents,
        continue_final_message, batches, ...) go to ``to_transformers()``."""
        template = chat_template or self.chat_template
        if kwargs or not conversation or not isinstance(conversation[0], dict):
            return self.to_transformers().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                return_dict=return_dict, chat_template=chat_template, **kwargs)
        if template is None:
            raise ValueError("this tokenizer has no chat template (the GGUF file has no tokenizer.chat_template)")
        text = _compiled_template(template).render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                                   **self.special_tokens_map)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (imports transformers)."""
        if self._transformers is None:
            from transformers import PreTrainedTokenizerFast

            self._transformers = PreTrainedTokenizerFast(tokenizer_object=self.backend_tokenizer,
                                                         chat_template=self.chat_template, **self.special_tokens_map)
        return self._transformers


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template in a sandbox set up as transformers sets up its own (trim_blocks, lstrip_blocks,
    loop controls, a tojson that keeps non-ASCII, raise_exception, strftime_now)."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def encode_chat(tokenizer, user_message: str, device="cpu"):
    """The user message in the tokenizer's chat template (if any), ready to generate: [1, L] int64."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(user_message)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.int64, device=device)

"""Generation conventions a transformers user expects: EOS from the model, stop strings, streamed text.

- ``resolve_eos(model, eos_token_id)``: the token ids that end generation (None: the model's own).
- ``StopStrings(stop, tokenizer)``: fed the generated ids one by one, says after which token the
  output must end.
- ``TextStreamer(tokenizer, callback)``: a ``stream=`` callable for the decoders that turns the
  token ids they emit into text, handing on only text that later tokens cannot change.

``tokenizer`` is anything with ``decode(ids, skip_special_tokens=...)``: a transformers tokenizer
or a ``tokenizers.Tokenizer``.
"""
from __future__ import annotations

import operator
import sys
import unicodedata

__all__ = ["resolve_eos", "StopStrings", "TextStreamer"]


def _as_id_list(value, what: str) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "tolist"):  # a tensor or an array
        value = value.tolist()
    items = [value] if isinstance(value, int) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{what} must be an int, a list of ints or None, got {type(value).__name__}") from None
    out = []
    for t in items:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{what} must hold ints, got {t!r}") from None
        if t < 0:
            raise ValueError(f"{what} must hold non-negative token ids, got {t}")
        out.append(t)
    return out


def resolve_eos(model, eos_token_id=None) -> list[int]:
    """The token ids that end generation, as a list (possibly empty: run to max_new_tokens).

    eos_token_id: None takes the model's own: ``model.config.eos_token_ids`` (from config.json or
    the GGUF metadata) together with the generation config's ``eos_token_id`` when the loader
    found one (``model.generation_config``: generation_config.json beside config.json, or a
    transformers model's generation config); an int or a list of ints is used as given; ``[]``
    turns EOS off. The order is kept and duplicates dropped.
    """
    if eos_token_id is not None:
        ids = _as_id_list(eos_token_id, "eos_token_id")
    else:
        ids = _as_id_list(getattr(getattr(model, "config", None), "eos_token_ids", None), "config.eos_token_ids")
        gen = getattr(model, "generation_config", None)
        gen_eos = gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None)
        ids += _as_id_list(gen_eos, "generation_config.eos_token_id")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        bad = [t for t in ids if t >= vocab]
        if bad and eos_token_id is not None:
            raise ValueError(f"eos_token_id {bad} lies outside the vocabulary [0, {vocab})")
        ids = [t for t in ids if t < vocab]  # a config's out-of-range EOS can never be generated
    return list(dict.fromkeys(ids))


class StopStrings:
    """Ends generation at the first stop string in the generated text, exactly at a token boundary.

    The rule: the output is cut right after the token whose text completes the first occurrence
    of any stop string (the stop string is kept, as transformers does). A stop string may span
    several tokens; one that ends inside a longer token stops after that whole token (the text can
    only be cut at token boundaries). Matching uses the decoded text of the generated tokens only
    (the prompt never matches), special tokens included as their text.

        stop = StopStrings(["\\n\\n", "User:"], tokenizer)
        for i, t in enumerate(new_ids):
            if stop.push(t):          # True: keep tokens up to and including t, then end
                break

    ``feed(ids)`` does the same for a batch and returns how many of its ids to keep.
    """

    def __init__(self, stop, tokenizer):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        if not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError("stop strings need a tokenizer with .decode(ids) (pass tokenizer=...)")
        self.stop = stop
        self.tokenizer = tokenizer
        # A stop string of n characters spans at most 4n tokens (a character can take one byte
        # token per UTF-8 byte); one more token before it keeps a leading space that decoders
        # strip from the first token of a text.
        self._lookback = 4 * max(len(s) for s in stop) + 2
        self.reset()

    def reset(self):
        self.ids: list[int] = []
        self.stopped = False

    def push(self, token_id) -> bool:
        """Add one generated token; True when the output must end after it (and after every later call)."""
        if self.stopped:
            return True
        self.ids.append(int(token_id))
        window = self.ids[-self._lookback:]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        if any(s in text for s in self.stop):
            # The match must end in the newest token: it was absent before it (else we had stopped).
            self.stopped = True
        return self.stopped

    def feed(self, ids) -> int | None:
        """Add a batch of generated ids; the number of them to keep when a stop string completed
        in this batch (its last kept id completes it), else None."""
        for n, t in enumerate(ids, 1):
            if self.push(t):
                return n
        return None


def _is_cjk(ch: str) -> bool:
    # CJK text has no spaces: transformers' streamer hands it on character by character.
    return unicodedata.east_asian_width(ch) == "W" and unicodedata.category(ch).startswith("L")


class TextStreamer:
    """Streams decoded text from the token ids a decoder emits (its ``stream=`` callable).

        streamer = TextStreamer(tokenizer)              # prints to stdout as text becomes stable
        decoder.generate(ids, 64, stream=streamer); streamer.end()

    Text is handed on only once later tokens cannot change it, as transformers' ``TextStreamer``
    does: up to the last space, a whole line at a newline, a CJK character at once, and never a
    character whose UTF-8 bytes are still split across tokens (decoded as U+FFFD). ``end()``
    hands on the rest. ``callback(text)`` receives each piece (default: print to stdout);
    ``.text`` holds everything handed on so far.
    """

    def __init__(self, tokenizer, callback=None, skip_special_tokens: bool = True):
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError("TextStreamer needs a tokenizer with .decode(ids)")
        self.tokenizer = tokenizer
        self.callback = callback if callback is not None else self._print
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._cache: list[int] = []  # ids since the last newline
        self._printed = 0  # characters of decode(_cache) already handed on

    @staticmethod
    def _print(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    def _decode(self) -> str:
        return self.tokenizer.decode(self._cache, skip_special_tokens=self.skip_special_tokens)

    def _hand_on(self, piece: str):
        if piece:
            self.text += piece
            self.callback(piece)

    def __call__(self, ids) -> str:
        """Take new token ids (a list or a 1-D tensor); hand on and return the text now stable."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        self._cache.extend(int(t) for t in ids)
        text = self._decode()
        if text.endswith("\n"):
            piece = text[self._printed:]
            self._cache, self._printed = [], 0
        elif text and not text.endswith("\ufffd") and _is_cjk(text[-1]):
            piece = text[self._printed:]
            self._printed += len(piece)
        else:
            piece = text[self._printed: max(text.rfind(" ") + 1, self._printed)]
            self._printed += len(piece)
        self._hand_on(piece)
        return piece

    put = __call__

    def end(self) -> str:
        """Hand on whatever is left (the end of the generation); returns it."""
        piece = self._decode()[self._printed:] if self._cache else ""
        self._cache, self._printed = [], 0
        self._hand_on(piece)
        return piece

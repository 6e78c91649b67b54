"""GGUF tokenizers converted by transformers, cached on disk.

For a GGUF tokenizer that ``mirror_rt.tokenizer`` does not build directly, transformers' GGUF
converter runs once and its result (the ``tokenizer.json`` text, the special tokens and the chat
template) is kept in one JSON file per GGUF path under ``cache_dir()``. An entry records the GGUF's
size and modification time and the transformers version that made it; an entry that no longer
matches (stale), cannot be read (corrupt) or cannot be written falls back to converting, with one
warning saying which. Entries are written to a temporary file and renamed into place, so
concurrent writers leave one whole entry and readers never see a partial one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings

CACHE_ENV = "MIRROR_RT_CACHE"
FORMAT = 1


class TokenizerCacheWarning(RuntimeWarning):
    """The tokenizer cache could not be used; the tokenizer was converted instead."""


def cache_dir() -> str:
    """$MIRROR_RT_CACHE, else $XDG_CACHE_HOME/mirror_rt, else ~/.cache/mirror_rt."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mirror_rt")


def entry_path(gguf_path) -> str:
    """Where the cached tokenizer of this GGUF file lives (one entry per absolute path)."""
    key = hashlib.sha256(os.path.abspath(os.fspath(gguf_path)).encode("utf-8")).hexdigest()[:24]
    return os.path.join(cache_dir(), "tokenizers", f"{key}.json")


def source_identity(gguf_path) -> dict:
    """What must still hold for an entry to be used: the file's path, size and mtime, and the
    converter's (transformers') version."""
    from importlib.metadata import PackageNotFoundError, version

    st = os.stat(gguf_path)
    try:
        converter = version("transformers")
    except PackageNotFoundError:
        converter = None
    return {"path": os.path.abspath(os.fspath(gguf_path)), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "transformers": converter}


def cached_conversion(gguf_path):
    """FastTokenizer of a GGUF file from the cache, or converted by transformers and stored."""
    from mirror_rt.tokenizer import FastTokenizer

    gguf_path = os.fspath(gguf_path)
    identity = source_identity(gguf_path)
    entry = _read_entry(entry_path(gguf_path), identity)
    if entry is None:
        entry = convert(gguf_path, identity)
        _write_entry(entry_path(gguf_path), entry)
    from tokenizers import Tokenizer

    return FastTokenizer(Tokenizer.from_str(entry["tokenizer"]), entry["special"], entry["chat_template"])


def convert(gguf_path, identity: dict) -> dict:
    """transformers' GGUF conversion, as a cache entry."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(f"{gguf_path}: this GGUF tokenizer is converted by transformers: "
                          "pip install 'mirror_rt[hf]'") from None
    from mirror_rt.tokenizer import SPECIAL_NAMES

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path) or ".", gguf_file=os.path.basename(gguf_path))
    special = {name: getattr(tok, name, None) for name in SPECIAL_NAMES}
    return {"format": FORMAT, "source": identity, "special": {k: str(v) if v is not None else None
                                                              for k, v in special.items()},
            "chat_template": getattr(tok, "chat_template", None), "tokenizer": tok.backend_tokenizer.to_str()}


def _read_entry(path: str, identity: dict) -> dict | None:
    """The entry, or None after one warning when it is stale or corrupt (None silently when absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        if entry.get("format") != FORMAT or not isinstance(entry.get("tokenizer"), str):
            raise ValueError("unknown layout")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        warnings.warn(f"tokenizer cache entry {path} cannot be read ({e}); converting the tokenizer again",
                      TokenizerCacheWarning, stacklevel=3)
        return None
    except (ValueError, AttributeError) as e:  # bad JSON, or JSON that is not an entry
        warnings.warn(f"tokenizer cache entry {path} is corrupt ({e}); converting the tokenizer again",
                      TokenizerCacheWarning, stacklevel=3)
        return None
    if entry.get("source") != identity:
        warnings.warn(f"tokenizer cache entry {path} is stale (made for {entry.get('source')}, the file is now "
                      f"{identity}); converting the tokenizer again", TokenizerCacheWarning, stacklevel=3)
        return None
    return entry


def _write_entry(path: str, entry: dict) -> None:
    """Write atomically (temporary file in the same folder, then rename); warn when impossible."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"tokenizer cache {os.path.dirname(path)} is not writable ({e}); the converted tokenizer "
                      f"is used without caching it", TokenizerCacheWarning, stacklevel=3)

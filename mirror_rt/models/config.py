"""Model configuration for the Llama family (Llama, Mistral, Qwen2, Qwen3), validated."""
from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position: int = 4096          # the context the model supports
    tie_embeddings: bool = False
    qkv_bias: bool = False            # Qwen2
    qk_norm: bool = False             # Qwen3: RMSNorm over head_dim on q and k
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # keys a query may see (itself included) on sliding layers
    sliding_layers: tuple[int, ...] = ()  # the layers that use the window (models/sliding_window.py)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"architecture {self.arch!r} is not supported; supported: {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        self.sliding_layers = tuple(self.sliding_layers) if self.sliding_window is not None else ()
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise ValueError(f"sliding_layers must lie in [0, {self.num_layers}), got {self.sliding_layers}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face config.json dict. Missing required keys raise ValueError naming them."""
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"config.json model_type must be one of {ARCHITECTURES}, got {model_type!r}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"config.json is missing required keys: {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}  # transformers 5 stores theta + scaling here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        max_pos = cfg.get("max_position_embeddings", 4096)
        window, window_layers = _sliding_window(cfg, model_type)
        eos = cfg.get("eos_token_id")
        return cls(
            arch=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None,
            max_position=max_pos,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            sliding_window=window,
            sliding_layers=window_layers,
        )


def _sliding_window(cfg: dict, model_type: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers using it) as transformers reads config.json: Mistral windows every
    layer when sliding_window is set; Qwen2 / Qwen3 only with use_sliding_window, on the layers
    layer_types marks "sliding_attention" (by default those from max_window_layers on)."""
    window = cfg.get("sliding_window")
    layers = cfg["num_hidden_layers"]
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if model_type not in ("mistral", "qwen2", "qwen3") or not window:
        return None, ()
    if model_type == "mistral":
        return int(window), tuple(range(layers))
    types = cfg.get("layer_types")
    if types:
        return int(window), tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return int(window), tuple(range(cfg.get("max_window_layers", 28), layers))

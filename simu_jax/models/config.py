"""ModelConfig: the subset of a Hugging Face `config.json` we implement, read strictly.

Anything in the HF config that would change the computation and that we do not implement
(another rope scaling kind, biases, sliding windows, another activation, ...) raises
`UnsupportedConfigError` naming the attribute, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "olmo", "olmo2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(ValueError):
    """An HF config attribute has a value simu-jax does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6  # llama / olmo2 RMSNorm; OLMo-1 LayerNorm uses a fixed 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    tie_word_embeddings: bool = False
    clip_qkv: float | None = None  # OLMo-1
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope scaling rope_type={self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"{name} must be positive, got {getattr(self, name)}")

    # --- derived facts used by the model code -------------------------------------------
    @property
    def norm_kind(self) -> str:
        """'layernorm_noparam' for OLMo-1, 'rmsnorm' otherwise."""
        return "layernorm_noparam" if self.model_type == "olmo" else "rmsnorm"

    @property
    def post_norm(self) -> bool:
        """OLMo-2 normalizes each sublayer's output (h = x + norm(f(x))) instead of its input."""
        return self.model_type == "olmo2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "olmo2"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- HF <-> ModelConfig --------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read an HF config dict strictly (see module docstring)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def reject(attr: str, ok) -> None:
            if attr in hf and hf[attr] is not None and not ok(hf[attr]):
                raise UnsupportedConfigError(f"config attribute {attr}={hf[attr]!r} is not supported by simu-jax")

        reject("attention_bias", lambda v: v is False)
        reject("mlp_bias", lambda v: v is False)
        reject("hidden_act", lambda v: v == "silu")
        reject("sliding_window", lambda v: False)
        reject("use_sliding_window", lambda v: v is False)
        reject("pretraining_tp", lambda v: v == 1)
        reject("partial_rotary_factor", lambda v: v == 1.0)
        reject("layer_types", lambda v: all(t == "full_attention" for t in v))
        if model_type != "olmo":
            reject("clip_qkv", lambda v: False)

        rope = _read_rope(hf)
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hidden // heads
        kv_heads = hf.get("num_key_value_heads") or heads
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            clip_qkv=None if hf.get("clip_qkv") is None else float(hf["clip_qkv"]),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **rope,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        from simu_jax.base import as_path

        path = as_path(path, "model directory")  # local, or a URL (gs://...)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json at {cfg_file}")
        try:
            hf = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not a valid config.json ({' '.join(str(e).split())[:100]})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{cfg_file}: not a valid config.json (not a JSON object)")
        return cls.from_hf_dict(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config dict that transformers loads as the same model."""
        architectures = {"llama": "LlamaForCausalLM", "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        out: dict[str, Any] = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            # Both spellings: transformers v5 reads rope_parameters, v4 reads rope_theta/rope_scaling.
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_type == "default" else {**rope, "type": self.rope_type},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out.update(rms_norm_eps=self.rms_norm_eps, mlp_bias=False, pretraining_tp=1)
        elif self.model_type == "olmo":
            out.update(clip_qkv=self.clip_qkv)
        else:
            out.update(rms_norm_eps=self.rms_norm_eps)
        return out


def _read_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from either v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfigError("config attribute rope_parameters with per-layer-type entries is not supported")
    scaling = dict(params or hf.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope scaling rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    attention_factor = scaling.get("attention_factor")
    if attention_factor not in (None, 1.0):
        raise UnsupportedConfigError(f"rope attention_factor={attention_factor!r} is not supported")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(scaling["low_freq_factor"])
        out["rope_high_freq_factor"] = float(scaling["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return out

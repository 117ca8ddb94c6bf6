"""Tiny random HF models, built with transformers + torch and saved to disk, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Olmo2Config, OlmoConfig

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    # A large init makes every feature move the logits far beyond the 1e-4 parity tolerance
    # and keeps greedy argmax margins wide.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)

VARIANTS = {
    "llama_gqa_untied": (LlamaConfig, dict(num_key_value_heads=2)),
    "llama_mqa_tied_linear": (
        LlamaConfig,
        dict(num_key_value_heads=1, tie_word_embeddings=True,
             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "llama_llama3_rope": (
        LlamaConfig,
        dict(num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ),
    "olmo_clip_tied": (OlmoConfig, dict(num_key_value_heads=4, clip_qkv=0.3, tie_word_embeddings=True)),
    "olmo2_gqa": (Olmo2Config, dict(num_key_value_heads=2)),
}


def build_hf_model(name: str, out_dir: Path, seed: int = 0, **overrides):
    """Build variant `name`, save it to out_dir (safetensors), return the torch model (eval, fp32)."""
    cls, extra = VARIANTS[name]
    torch.manual_seed(seed)
    config = cls(**{**COMMON, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    model.save_pretrained(out_dir)
    return model

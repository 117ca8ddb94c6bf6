"""LLaMA / OLMo / OLMo-2 in Flax NNX, HF checkpoints in and out."""
from simu_jax.models.config import ModelConfig, UnsupportedConfigError
from simu_jax.models.transformer import (
    CausalLM,
    abstract_model,
    apply,
    apply_with_aux,
    count_params,
    init_model,
    merge_params,
    split_params,
)

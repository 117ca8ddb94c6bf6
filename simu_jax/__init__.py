"""simu-jax: Selective Influence Machine Unlearning in JAX/Flax."""
__version__ = "0.1.0"

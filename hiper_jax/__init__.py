"""hiper_jax: Hierarchical Plan-Execute RL (HiPER) for LLM agents in JAX/Flax."""

__version__ = "0.1.0"

"""Rollout: host-process environment pool (and, later, the multi-turn collector)."""

from hiper_jax.rollout.env_pool import EnvPool, GymFactory, StepResult

__all__ = ["EnvPool", "GymFactory", "StepResult"]

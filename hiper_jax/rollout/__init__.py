"""Rollouts: host-process env pools, the multi-turn collector, packing turns into arrays."""

from hiper_jax.rollout.env_pool import EnvPool, GymFactory, StepResult

__all__ = ["EnvPool", "GymFactory", "StepResult"]

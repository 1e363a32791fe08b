"""The names that configs, validation and the code that runs them share, one place each.

This module imports no JAX: config files and :func:`hiper_jax.train.config.validate` read it
before a runtime is chosen. The functions behind the names live where they run
(:data:`hiper_jax.advantages.ESTIMATORS`, :func:`hiper_jax.train.losses.kl_penalty`,
:func:`hiper_jax.distributed.make_mesh`).
"""

from __future__ import annotations

import dataclasses

# The critic's value heads, in the order of its output ``[..., 3]``: the low-level (action)
# value, the high-level (subgoal) value and the termination (switch) value.
VALUE_HEADS = ("low", "high", "term")

# ``ppo.kl_estimator``: the per-token KL penalty against the reference policy.
KL_ESTIMATORS = ("low_var_kl", "kl", "mse")

# ``ppo.old_logp``: the update's old log-probs from a pass of the actor over the batch, or the
# ones the sampler drew the tokens with.
OLD_LOGP_SOURCES = ("recompute", "sampler")

# The device mesh's axes, and those that split batch rows (data-major).
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class EstimatorTraits:
    """What an advantage estimator asks of the trainer.

    Attributes:
      value_heads: the value heads trained on its returns (a subset of :data:`VALUE_HEADS`;
        () = no critic).
      needs_groups: several rollouts per task (``group_ids``) are required.
      needs_states: per-turn observation identities (``state_ids``) are required.
    """

    value_heads: tuple[str, ...]
    needs_groups: bool = False
    needs_states: bool = False


# ``advantage.estimator``.
ESTIMATOR_TRAITS: dict[str, EstimatorTraits] = {
    "hae": EstimatorTraits(VALUE_HEADS),
    "turn_gae": EstimatorTraits(("low",)),
    "grpo": EstimatorTraits((), needs_groups=True),
    "rloo": EstimatorTraits((), needs_groups=True),
    "gigpo": EstimatorTraits((), needs_groups=True, needs_states=True),
    "hae_no_term": EstimatorTraits(("low", "high")),
    "hae_no_keep_penalty": EstimatorTraits(VALUE_HEADS),
    "hae_flat_subgoal": EstimatorTraits(VALUE_HEADS),
}
ESTIMATOR_NAMES = tuple(ESTIMATOR_TRAITS)
GROUP_ESTIMATORS = tuple(name for name, traits in ESTIMATOR_TRAITS.items() if traits.needs_groups)
CRITIC_FREE_ESTIMATORS = tuple(name for name, traits in ESTIMATOR_TRAITS.items() if not traits.value_heads)

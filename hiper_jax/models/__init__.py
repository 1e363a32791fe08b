"""Models: the Qwen2/Qwen2.5 port (:mod:`.qwen2`) and the critic (:mod:`.value_heads`) as Flax NNX
modules, and the logical-axis sharding rules that place their parameters (:mod:`.sharding`)."""

from hiper_jax.models import qwen2, sharding, value_heads
from hiper_jax.models.qwen2 import Qwen2Config, param_shardings
from hiper_jax.models.sharding import DEFAULT_RULES

__all__ = ["DEFAULT_RULES", "Qwen2Config", "param_shardings", "qwen2", "sharding", "value_heads"]

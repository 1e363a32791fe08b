"""Models: the Qwen2/Qwen2.5 port (:mod:`.qwen2`), critic value heads (:mod:`.value_heads`) and
the logical-axis sharding rules shared by both (:mod:`.sharding`)."""

from hiper_jax.models import qwen2, sharding, value_heads
from hiper_jax.models.qwen2 import Qwen2Config, param_shardings
from hiper_jax.models.sharding import DEFAULT_RULES

__all__ = ["DEFAULT_RULES", "Qwen2Config", "param_shardings", "qwen2", "sharding", "value_heads"]

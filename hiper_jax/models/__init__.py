"""Models: the Qwen2/Qwen2.5 port (:mod:`.qwen2`), Qwen2.5-VL on top of it (:mod:`.qwen2_5_vl`)
and the critic (:mod:`.value_heads`) as Flax NNX modules, and the logical-axis sharding rules that
place their parameters (:mod:`.sharding`)."""

from hiper_jax.models import qwen2, qwen2_5_vl, sharding, value_heads
from hiper_jax.models.qwen2 import Qwen2Config, param_shardings
from hiper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
from hiper_jax.models.sharding import DEFAULT_RULES

__all__ = ["DEFAULT_RULES", "Qwen2Config", "Qwen2_5_VLConfig", "param_shardings", "qwen2",
           "qwen2_5_vl", "sharding", "value_heads"]

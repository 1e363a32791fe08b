"""Files shipped inside the package (importing this module reads no JAX).

``TINY_ALFWORLD`` is the embedded default's HF checkpoint directory (config, safetensors,
tokenizer), made by ``python -m hiper_jax.experiments.tiny``.
"""

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))
TINY_ALFWORLD = os.path.join(ASSETS, "tiny_alfworld")

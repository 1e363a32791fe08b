"""Files shipped inside the package (importing this module reads no JAX).

``TINY_ALFWORLD`` is the embedded default's HF checkpoint directory (config, safetensors,
tokenizer), made by ``python -m hiper_jax.experiments.tiny``. ``TINY_MEDVISTA`` is the tiny Qwen2.5-VL warm
start of ``configs/medvista_tiny.py``, made by ``python -m hiper_jax.experiments.medvista_vlm``
(``--iterations 0 --save-dir``).
"""

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))
TINY_ALFWORLD = os.path.join(ASSETS, "tiny_alfworld")
TINY_MEDVISTA = os.path.join(ASSETS, "tiny_medvista")

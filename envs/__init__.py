"""hiper_envs: text environments (gymnasium API) for hiper_jax, installed from ./envs."""

import gymnasium as _gymnasium

# --- WebShop: registered lazily (the entry point imports the env module on first make) ---
if "hiper/WebShop-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/WebShop-v0", entry_point="hiper_envs.webshop.env:WebShopEnv")

# --- ALFWorld: registered lazily (the entry point imports the env module on first make) ---
if "hiper/ALFWorld-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/ALFWorld-v0", entry_point="hiper_envs.alfworld.env:AlfWorldEnv")

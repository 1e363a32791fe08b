"""hiper_envs: text environments (gymnasium API) for hiper_jax, installed from ./envs."""

import gymnasium as _gymnasium

# --- WebShop: registered lazily (the entry point imports the env module on first make) ---
if "hiper/WebShop-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/WebShop-v0", entry_point="hiper_envs.webshop.env:WebShopEnv")

# --- ALFWorld: registered lazily (the entry point imports the env module on first make) ---
if "hiper/ALFWorld-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/ALFWorld-v0", entry_point="hiper_envs.alfworld.env:AlfWorldEnv")

# --- ChooseWord: a tiny sanity-check task for the RL loop ---
if "hiper/ChooseWord-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/ChooseWord-v0", entry_point="hiper_envs.choose_word:ChooseWordEnv")

# --- MedVista: registered lazily (the entry point imports the env module on first make) ---
if "hiper/MedVista-v0" not in _gymnasium.registry:
    _gymnasium.register(id="hiper/MedVista-v0", entry_point="hiper_envs.medvista.env:MedVistaEnv")

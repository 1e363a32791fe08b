"""hiper_envs: text environments (gymnasium API) for hiper_jax, installed from ./envs."""

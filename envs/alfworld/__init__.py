"""ALFWorld on the real engine, offline: game generator, gymnasium env, expert demonstrations.

- `generate_games` / `python -m hiper_envs.alfworld.generate`: ALFWorld-format games for the
  six task types from the layouts shipped with alfworld (no download needed).
- `AlfWorldEnv`, registered as `hiper/ALFWorld-v0`: generated games or the official data.
- `write_demos` / `python -m hiper_envs.alfworld.demos`: expert demonstrations with subgoals.

The engine is the `[alfworld]` extra; importing this package does not need it.
"""

from hiper_envs.alfworld.games import find_games, official_games, read_game_info

ENV_ID = "hiper/ALFWorld-v0"  # registered by `hiper_envs` (envs/__init__.py)


def __getattr__(name):
    # Engine-backed parts import on first use, so `import hiper_envs.alfworld` stays light.
    if name == "AlfWorldEnv":
        from hiper_envs.alfworld.env import AlfWorldEnv

        return AlfWorldEnv
    if name in ("generate_games", "GeneratorConfig", "TASK_TYPES"):
        from hiper_envs.alfworld import generate

        return getattr(generate, name)
    if name == "write_demos":
        from hiper_envs.alfworld.demos import write_demos

        return write_demos
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENV_ID",
    "AlfWorldEnv",
    "GeneratorConfig",
    "TASK_TYPES",
    "find_games",
    "generate_games",
    "official_games",
    "read_game_info",
    "write_demos",
]

"""Games shared by the ALFWorld tests: generated once per session (a few seconds)."""

import pytest
from hiper_envs.alfworld.generate import TASK_TYPES, generate_games

GAMES_PER_TYPE = 2
SEED = 11


@pytest.fixture(scope="session")
def games_root(tmp_path_factory):
    """Root of a small default suite: GAMES_PER_TYPE train games per task type, 6 eval games."""
    root = tmp_path_factory.mktemp("alfworld_games")
    generate_games(str(root), GAMES_PER_TYPE * len(TASK_TYPES), seed=SEED, progress=False)
    generate_games(str(root), len(TASK_TYPES), seed=SEED, split="eval", progress=False)
    return root


@pytest.fixture(scope="session")
def train_games(games_root):
    from hiper_envs.alfworld.games import find_games

    return find_games(str(games_root / "train"))

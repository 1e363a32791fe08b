"""WebShop as an in-process gymnasium env (``hiper/WebShop-v0``): catalog, search, pages, reward.

- `WebShopEnv` (`hiper_envs.webshop.env`): the text environment.
- `get_catalog` / `generate_catalog` / `load_data_dir`: generated or official data.
- `webshop_reward`: WebShop's purchase reward; `tagger_name`: which title-noun tagger runs.
- `oracle_action`, `write_demonstrations` (`hiper_envs.webshop.demos`): expert play.
"""

from hiper_envs.webshop.catalog import Catalog, get_catalog
from hiper_envs.webshop.generate import CatalogConfig, generate_catalog, write_catalog
from hiper_envs.webshop.loader import load_data_dir
from hiper_envs.webshop.nouns import tagger_name
from hiper_envs.webshop.reward import RewardDetails, webshop_reward
from hiper_envs.webshop.schema import Goal, Product, Review, WebShopDataError

ENV_ID = "hiper/WebShop-v0"


def register() -> None:
    """Register ``hiper/WebShop-v0`` with gymnasium (idempotent)."""
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="hiper_envs.webshop.env:WebShopEnv")


register()

__all__ = [
    "ENV_ID",
    "Catalog",
    "CatalogConfig",
    "Goal",
    "Product",
    "RewardDetails",
    "Review",
    "WebShopDataError",
    "generate_catalog",
    "get_catalog",
    "load_data_dir",
    "register",
    "tagger_name",
    "webshop_reward",
    "write_catalog",
]

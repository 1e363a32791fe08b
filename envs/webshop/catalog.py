"""A catalog: products, goals with splits, and the search index, built once per process.

`get_catalog` memoises catalogs by their recipe (a data directory, or a generator config),
so all environments of one worker process share one catalog and one index, and an
environment pickles as its constructor arguments only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections.abc import Sequence

from hiper_envs.webshop.generate import CatalogConfig, generate_records, split_goals
from hiper_envs.webshop.loader import load_data_dir, parse_product
from hiper_envs.webshop.schema import Goal, Product
from hiper_envs.webshop.search import SearchIndex

SPLITS = ("train", "eval", "all")


@dataclasses.dataclass
class Catalog:
    products: list[Product]
    goals: list[Goal]
    source: str

    def __post_init__(self) -> None:
        self.by_asin = {product.asin: product for product in self.products}
        self._search_index: SearchIndex | None = None

    @property
    def search_index(self) -> SearchIndex:
        if self._search_index is None:
            self._search_index = SearchIndex(self.products)
        return self._search_index

    def search(self, query: str) -> list[Product]:
        """Top products for `query` (at most 50), best first."""
        return [self.products[i] for i in self.search_index.search(query)]

    def goals_for(self, split: str) -> list[Goal]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.goals) if split == "all" else [g for g in self.goals if g.split == split]


def catalog_from_generated(config: CatalogConfig) -> Catalog:
    """Generate a catalog in memory, parsing each record as the loader parses the files.

    Records are parsed as they are made, so the raw records never all exist at once.
    """
    rng = random.Random(config.seed)
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}
    products, goals = [], []
    for i, (record, entry, product_goals) in enumerate(generate_records(config)):
        products.append(parse_product(record, f"<generated>: product #{i}", entry["attributes"], rng, shared))
        goals.extend(product_goals)
    return Catalog(products, split_goals(goals), source=f"generated {config}")


def catalog_from_products(
    products: Sequence[Product], goals: Sequence[Goal], source: str = "<memory>"
) -> Catalog:
    return Catalog(list(products), list(goals), source)


@functools.lru_cache(maxsize=4)
def get_catalog(
    data_dir: str | None = None,
    num_products: int | None = None,
    seed: int = 0,
    human_goals: bool = True,
    config: CatalogConfig | None = None,
) -> Catalog:
    """The catalog of `data_dir` (official or generated files) or a generated one (cached).

    Without `data_dir`, generates ``config`` (default: `num_products` products, 1000 when
    None, from `seed`).
    With `data_dir`, `num_products` keeps the first N products (None: all) and `seed` seeds
    the prices drawn inside price ranges and the goals' price limits.
    """
    if data_dir is not None:
        data_dir = os.path.abspath(data_dir)
        products, goals = load_data_dir(
            data_dir, num_products=num_products, human_goals_first=human_goals, seed=seed
        )
        return Catalog(products, goals, source=data_dir)
    if config is None:
        config = CatalogConfig(num_products=num_products or 1000, seed=seed)
    return catalog_from_generated(config)

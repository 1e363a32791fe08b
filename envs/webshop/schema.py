"""Products and goals of a WebShop catalog, in the fields the official data and reward use.

A `Product` is one parsed record of WebShop's ``items_shuffle*.json`` (the official loader's
renamed fields: ``Title``, ``Description``, ``BulletPoints``, ``Attributes``, ``options``) and a
`Goal` is one entry of WebShop's goal list (``instruction_text``, ``attributes``,
``goal_options``, ``price_upper`` plus the target product's ``query``, ``name`` and
``product_category``). Both are plain frozen dataclasses so that the reward functions can be
called on hand-built values in tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# Goal options are a mapping {option name: value} for synthetic (and generated) goals and a
# list of values for human goals, as in WebShop; the option reward treats the two differently.
GoalOptions = Mapping[str, str] | tuple[str, ...]

NO_PRICE_LIMIT = 1_000_000.0


class WebShopDataError(ValueError):
    """A data file (or in-memory record) does not follow the WebShop schema.

    The message names the file, the record and the field, e.g.
    ``items_shuffle.json: product #3 (asin 'B0X'): field 'name' must be a string, got int``.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Review:
    title: str
    score: int
    body: str


@dataclasses.dataclass(frozen=True, slots=True)
class Product:
    """One catalog product (WebShop's parsed product record).

    `options` maps a lower-cased option name to its lower-cased values in page order.
    `option_price_deltas` maps ``(name, value)`` to the price added when that value is chosen
    (empty for official data, whose options do not change the price). `price` is the price of
    the product with no priced option chosen (WebShop's ``product_prices[asin]``).
    """

    asin: str
    title: str
    category: str
    query: str
    product_category: str
    description: str = ""
    bullet_points: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    options: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    option_price_deltas: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    price: float = 100.0
    price_tag: str = "$100.0"
    rating: str = "N.A."
    reviews: tuple[Review, ...] = ()

    def price_with(self, options: Mapping[str, str]) -> float:
        """Price when `options` ({name: value}) are selected."""
        extra = sum(self.option_price_deltas.get((name, value), 0.0) for name, value in options.items())
        return round(self.price + extra, 2)


@dataclasses.dataclass(frozen=True, slots=True)
class Goal:
    """One shopping task: the instruction and what the reward compares a purchase against.

    `goal_id` is unique within a catalog; `split` is ``"train"`` or ``"eval"``.
    """

    goal_id: str
    asin: str
    instruction_text: str
    category: str
    query: str
    name: str
    product_category: str
    attributes: tuple[str, ...]
    goal_options: GoalOptions
    price_upper: float
    split: str = "train"
    weight: float = 1.0

    def options_dict(self) -> dict[str, str]:
        """Goal options as {name: value}; human goals (a bare value list) give {}."""
        return dict(self.goal_options) if isinstance(self.goal_options, Mapping) else {}

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["attributes"] = list(self.attributes)
        record["goal_options"] = (
            dict(self.goal_options) if isinstance(self.goal_options, Mapping) else list(self.goal_options)
        )
        return record

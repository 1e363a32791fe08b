"""Read WebShop's official data files (or generated ones in the same format) into products and goals.

A data directory holds
- ``items_shuffle.json`` (or ``items_shuffle_1000.json``): the scraped products, a JSON list of
  records with ``asin``, ``name``, ``category``, ``query``, ``product_category``,
  ``full_description``, ``small_description``, ``pricing`` ("$12.99" or "$12.99 - $24.99"),
  ``customization_options`` ({name: [{"value": ..., "image": ...}]}) and ``images``;
- ``items_ins_v2.json`` (or ``items_ins_v2_1000.json``): {asin: {"attributes": [...],
  "instruction": ..., "instruction_attributes": [...]}};
- ``items_human_ins.json`` (optional): {asin: [{"instruction": ..., "instruction_attributes":
  [...], "instruction_options": [...]}]}, the human-written goals;
- ``goals.json`` (optional, written by our generator): the goal list itself, which then takes
  precedence over the instruction files.

Parsing follows WebShop's ``load_products``: records whose asin is "nan" or longer than 10
characters and repeated asins are skipped, option names and values are lower-cased with "/"
written " | ", a missing price becomes $100, a price range gets a price drawn uniformly inside
it (seeded here; unseeded in WebShop). Goals follow ``get_human_goals``/``get_synthetic_goals``:
the price limit is the larger of two of the next four multiples of $10 above the price, and the
goal list is shuffled with WebShop's seed 233. Every schema error names the file, the record
and the field (`WebShopDataError`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from hiper_envs.webshop.schema import NO_PRICE_LIMIT, Goal, Product, Review, WebShopDataError

PRODUCT_FILES = ("items_shuffle.json", "items_shuffle_1000.json")
ATTRIBUTE_FILES = ("items_ins_v2.json", "items_ins_v2_1000.json")
HUMAN_GOALS_FILE = "items_human_ins.json"
GOALS_FILE = "goals.json"
PRICE_STEPS = tuple(10.0 * i for i in range(1, 100))
GOAL_SHUFFLE_SEED = 233
OFFICIAL_EVAL_GOALS = 500
DUMMY_ATTRIBUTE = "DUMMY_ATTR"


def read_json(path: str) -> Any:
    """json.load with the file named in any error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WebShopDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise WebShopDataError(f"{path}: not valid JSON ({error})") from None


class _Fields:
    """Typed field access on one JSON record that names file/record/field in its errors."""

    def __init__(self, record: Any, where: str):
        if not isinstance(record, dict):
            raise WebShopDataError(f"{where}: must be a JSON object, got {type(record).__name__}")
        self.record = record
        self.where = where

    def _fail(self, field: str, expected: str, value: Any) -> None:
        raise WebShopDataError(
            f"{self.where}: field {field!r} must be {expected}, got {type(value).__name__} {value!r:.60}"
        )

    def str(self, field: str, default: str | None = None) -> str:
        value = self.record.get(field, default)
        if value is None and default is None:
            raise WebShopDataError(f"{self.where}: missing field {field!r}")
        if not isinstance(value, str):
            self._fail(field, "a string", value)
        return value

    def str_list(self, field: str, allow_str: bool = False) -> list[str]:
        value = self.record.get(field)
        if value is None:
            return []
        if allow_str and isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail(field, "a list of strings", value)
        return value

    def number(self, field: str) -> float:
        value = self.record.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(field, "a number", value)
        return float(value)


def _parse_pricing(pricing: Any, fields: _Fields) -> list[float]:
    if pricing is None or pricing == "" or pricing == []:
        return []
    if isinstance(pricing, (int, float)) and not isinstance(pricing, bool):
        return [float(pricing)]
    if not isinstance(pricing, str):
        fields._fail("pricing", 'a price string such as "$12.99" or "$12.99 - $24.99"', pricing)
    try:
        prices = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in pricing.split("$")[1:]]
    except InvalidOperation:
        prices = []
    if not prices:
        fields._fail("pricing", 'a price string such as "$12.99" or "$12.99 - $24.99"', pricing)
    return prices[:2]


def _price_tag(prices: Sequence[float]) -> str:
    if len(prices) == 1:
        return f"${prices[0]}"
    return f"${prices[0]} to ${prices[1]}"


def _parse_options(
    fields: _Fields, shared: dict[tuple[str, ...], tuple[str, ...]]
) -> tuple[dict[str, tuple[str, ...]], dict[tuple[str, str], float]]:
    raw = fields.record.get("customization_options") or {}
    if not isinstance(raw, dict):
        fields._fail("customization_options", "an object {name: [{value: ...}]}", raw)
    options: dict[str, tuple[str, ...]] = {}
    deltas: dict[tuple[str, str], float] = {}
    for raw_name, contents in raw.items():
        if contents is None:
            continue
        name = sys.intern(raw_name.lower())
        if not isinstance(contents, list):
            fields._fail(f"customization_options.{raw_name}", "a list of {value: ...} objects", contents)
        values = []
        for i, content in enumerate(contents):
            value = content.get("value") if isinstance(content, dict) else None
            if not isinstance(value, str):
                _Fields(content, f"{fields.where}: customization_options.{raw_name}[{i}]").str("value")
            value = sys.intern(value.strip().replace("/", " | ").lower())
            values.append(value)
            if "price_delta" in content:
                entry = _Fields(content, f"{fields.where}: customization_options.{raw_name}[{i}]")
                deltas[(name, value)] = entry.number("price_delta")
        # One tuple object per distinct value list: catalogs repeat a few hundred of them.
        options[name] = shared.setdefault(tuple(values), tuple(values))
    return options, deltas


def _parse_reviews(fields: _Fields) -> tuple[Review, ...]:
    raw = fields.record.get("reviews") or []
    if not isinstance(raw, list):
        fields._fail("reviews", "a list of {title, score, body} objects", raw)
    reviews = []
    for i, item in enumerate(raw):
        entry = _Fields(item, f"{fields.where}: reviews[{i}]")
        score = item.get("score", item.get("stars", 0))
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            entry._fail("score", "a number", score)
        body = item.get("body", item.get("review", ""))
        if not isinstance(body, str):
            entry._fail("body", "a string", body)
        reviews.append(Review(title=entry.str("title", ""), score=int(score), body=body))
    return tuple(reviews)


def parse_product(
    record: Any,
    where: str,
    attributes: Sequence[str],
    rng: random.Random,
    shared: dict[tuple[str, ...], tuple[str, ...]] | None = None,
) -> Product | None:
    """One raw ``items_shuffle`` record -> Product (None for a record WebShop skips).

    `shared` maps option value lists to one tuple object each, so products share them.
    """
    fields = _Fields(record, where)
    asin = fields.str("asin")
    if asin == "nan" or len(asin) > 10:
        return None
    fields.where = f"{where} (asin {asin!r})"
    prices = _parse_pricing(record.get("pricing"), fields)
    options, deltas = _parse_options(fields, {} if shared is None else shared)
    if not prices:
        prices, price = [100.0], 100.0
    elif deltas or len(prices) == 1:
        price = prices[0]
    else:
        price = rng.uniform(prices[0], prices[1])
    reviews = _parse_reviews(fields)
    rating = record.get("rating", "N.A.")
    return Product(
        asin=asin,
        title=fields.str("name"),
        category=sys.intern(fields.str("category")),
        query=sys.intern(fields.str("query").lower().strip()),
        product_category=sys.intern(fields.str("product_category")),
        description=fields.str("full_description", ""),
        bullet_points=tuple(fields.str_list("small_description", allow_str=True)),
        attributes=tuple(sys.intern(a) for a in attributes) if attributes else (DUMMY_ATTRIBUTE,),
        options=options,
        option_price_deltas=deltas,
        price=price,
        price_tag=_price_tag(prices),
        rating=str(rating),
        reviews=reviews,
    )


def parse_products(
    records: Any,
    path: str,
    attributes: Mapping[str, Any],
    attributes_path: str = "attributes",
    seed: int = 0,
    num_products: int | None = None,
) -> list[Product]:
    """All products of one ``items_shuffle`` list, deduplicated by asin as WebShop does."""
    if not isinstance(records, list):
        raise WebShopDataError(f"{path}: must be a JSON list of product records")
    if num_products is not None:
        records = records[:num_products]
    rng = random.Random(seed)
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}
    seen: set[str] = set()
    products = []
    for i, record in enumerate(records):
        asin = record.get("asin") if isinstance(record, dict) else None
        entry = _attribute_entry(attributes, asin, attributes_path) if isinstance(asin, str) else {}
        product_attributes = entry.get("attributes")
        product = parse_product(record, f"{path}: product #{i}", product_attributes or (), rng, shared)
        if product is None or product.asin in seen:
            continue
        seen.add(product.asin)
        products.append(product)
    if not products:
        raise WebShopDataError(f"{path}: no products")
    return products


def _attribute_entry(attributes: Mapping[str, Any], asin: str, path: str) -> dict:
    entry = attributes.get(asin) or {}
    if not isinstance(entry, dict):
        raise WebShopDataError(f"{path}: asin {asin!r}: must be an object with 'attributes'")
    value = entry.get("attributes")
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise WebShopDataError(f"{path}: asin {asin!r}: field 'attributes' must be a list of strings")
    return entry


def price_limit(price: float, rng: random.Random) -> float | None:
    """WebShop's goal price limit: larger of two of the next four $10 steps above `price`."""
    steps = [p for p in PRICE_STEPS if p > price][:4]
    if len(steps) < 2:
        return None
    return max(rng.sample(steps, 2))


def _price_text(limit: float | None) -> str:
    return "" if limit is None else f", and price lower than {limit:.2f} dollars"


def human_goals(
    products: Sequence[Product], human: Mapping[str, Any], path: str, rng: random.Random
) -> list[Goal]:
    """Goals from ``items_human_ins.json`` in WebShop's order (products, then instructions)."""
    goals = []
    for product in products:
        for i, raw in enumerate(human.get(product.asin) or ()):
            fields = _Fields(raw, f"{path}: asin {product.asin!r} instruction #{i}")
            goal_attributes = fields.str_list("instruction_attributes")
            if not goal_attributes:
                continue
            limit = price_limit(product.price, rng)
            goals.append(
                Goal(
                    goal_id=f"{product.asin}-{i}",
                    asin=product.asin,
                    instruction_text=fields.str("instruction").strip(".") + _price_text(limit),
                    category=product.category,
                    query=product.query,
                    name=product.title,
                    product_category=product.product_category,
                    attributes=tuple(goal_attributes),
                    goal_options=tuple(fields.str_list("instruction_options")),
                    price_upper=NO_PRICE_LIMIT if limit is None else limit,
                )
            )
    return goals


def synthetic_goals(
    products: Sequence[Product], attributes: Mapping[str, Any], path: str, rng: random.Random
) -> list[Goal]:
    """Goals from ``items_ins_v2.json``: one per product and option combination, as WebShop."""
    goals = []
    counts: dict[str, int] = {}
    for product in products:
        entry = _attribute_entry(attributes, product.asin, path)
        instruction = entry.get("instruction")
        if not instruction:
            continue
        fields = _Fields(entry, f"{path}: asin {product.asin!r}")
        goal_attributes = fields.str_list("instruction_attributes")
        if not goal_attributes:
            raise WebShopDataError(f"{path}: asin {product.asin!r}: field 'instruction_attributes' is empty")
        limit = price_limit(product.price, rng)
        names = sorted(product.options)
        for k, combination in enumerate(itertools.product(*(product.options[n] for n in names))):
            chosen = dict(zip(names, combination, strict=True))
            option_text = ", and ".join(f"{n}: {v}" for n, v in chosen.items())
            with_options = f" with {option_text}" if option_text else ""
            goals.append(
                Goal(
                    goal_id=f"{product.asin}-{k}",
                    asin=product.asin,
                    instruction_text=f"{fields.str('instruction')}{with_options}{_price_text(limit)}",
                    category=product.category,
                    query=product.query,
                    name=product.title,
                    product_category=product.product_category,
                    attributes=tuple(goal_attributes),
                    goal_options=chosen,
                    price_upper=NO_PRICE_LIMIT if limit is None else limit,
                )
            )
            for attribute in goal_attributes:
                counts[attribute] = counts.get(attribute, 0) + 1
    return [
        _with(goal, weight=sum(1.0 / counts[a] for a in goal.attributes) / len(goal.attributes))
        for goal in goals
    ]


def _with(goal: Goal, **changes: Any) -> Goal:
    return dataclasses.replace(goal, **changes)


def official_splits(goals: Sequence[Goal]) -> list[Goal]:
    """Shuffle with WebShop's seed 233; the first 500 are ``eval`` (HiPER's test set), the rest ``train``.

    Catalogs with fewer than 1,000 goals keep half of them for ``eval``.
    """
    shuffled = list(goals)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(shuffled)
    n_eval = min(OFFICIAL_EVAL_GOALS, len(shuffled) // 2)
    return [_with(goal, split="eval" if i < n_eval else "train") for i, goal in enumerate(shuffled)]


def parse_goals_file(
    records: Any, path: str, by_asin: Mapping[str, Product], skip_unknown: bool = False
) -> list[Goal]:
    """Goals stored by the generator (``goals.json``: a list of `Goal.to_json` records).

    A goal whose asin is not among the products is an error, or skipped with `skip_unknown`
    (when only the first N products were loaded).
    """
    if not isinstance(records, list):
        raise WebShopDataError(f"{path}: must be a JSON list of goal records")
    goals = []
    for i, record in enumerate(records):
        fields = _Fields(record, f"{path}: goal #{i}")
        asin = fields.str("asin")
        if asin not in by_asin:
            if skip_unknown:
                continue
            raise WebShopDataError(f"{path}: goal #{i}: field 'asin' names unknown product {asin!r}")
        raw_options = record.get("goal_options", {})
        if isinstance(raw_options, dict) and all(isinstance(v, str) for v in raw_options.values()):
            goal_options: Any = dict(raw_options)
        elif isinstance(raw_options, list) and all(isinstance(v, str) for v in raw_options):
            goal_options = tuple(raw_options)
        else:
            raise WebShopDataError(
                f"{path}: goal #{i}: field 'goal_options' must be an object or a list of strings"
            )
        split = fields.str("split", "train")
        if split not in ("train", "eval"):
            raise WebShopDataError(
                f"{path}: goal #{i}: field 'split' must be 'train' or 'eval', got {split!r}"
            )
        goals.append(
            Goal(
                goal_id=fields.str("goal_id"),
                asin=asin,
                instruction_text=fields.str("instruction_text"),
                category=fields.str("category"),
                query=fields.str("query"),
                name=fields.str("name"),
                product_category=fields.str("product_category"),
                attributes=tuple(fields.str_list("attributes")),
                goal_options=goal_options,
                price_upper=fields.number("price_upper"),
                split=split,
                weight=float(record.get("weight", 1.0)),
            )
        )
    return goals


def _first_existing(data_dir: str, names: Iterable[str]) -> str | None:
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def load_data_dir(
    data_dir: str, *, num_products: int | None = None, human_goals_first: bool = True, seed: int = 0
) -> tuple[list[Product], list[Goal]]:
    """Products and goals (with splits) of a WebShop data directory; see the module docstring.

    Goals come from ``goals.json`` if present, else from ``items_human_ins.json`` when
    `human_goals_first` and the file exists, else from the synthetic instructions of
    ``items_ins_v2``. `seed` seeds the prices drawn inside price ranges and the price limits.
    """
    if not os.path.isdir(data_dir):
        raise WebShopDataError(f"{data_dir}: not a directory")
    products_path = _first_existing(data_dir, PRODUCT_FILES)
    if products_path is None:
        raise WebShopDataError(f"{data_dir}: no products file (one of {', '.join(PRODUCT_FILES)})")
    attributes_path = _first_existing(data_dir, ATTRIBUTE_FILES)
    attributes = read_json(attributes_path) if attributes_path else {}
    if not isinstance(attributes, dict):
        raise WebShopDataError(f"{attributes_path}: must be a JSON object keyed by asin")
    products = parse_products(
        read_json(products_path), products_path, attributes, attributes_path or "", seed, num_products
    )
    rng = random.Random(seed + 1)
    goals_path = os.path.join(data_dir, GOALS_FILE)
    human_path = os.path.join(data_dir, HUMAN_GOALS_FILE)
    if os.path.exists(goals_path):
        goals = parse_goals_file(
            read_json(goals_path),
            goals_path,
            {p.asin: p for p in products},
            skip_unknown=num_products is not None,
        )
    elif human_goals_first and os.path.exists(human_path):
        human = read_json(human_path)
        if not isinstance(human, dict):
            raise WebShopDataError(f"{human_path}: must be a JSON object keyed by asin")
        goals = official_splits(human_goals(products, human, human_path, rng))
    else:
        goals = official_splits(synthetic_goals(products, attributes, attributes_path or data_dir, rng))
    if not goals:
        raise WebShopDataError(f"{data_dir}: no goals (no instructions for the loaded products)")
    return products, goals

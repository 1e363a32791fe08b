"""Procedural WebShop catalog and goals in the official file format, reproducible by seed.

    python -m hiper_envs.webshop.generate --out DIR --num-products 1000 --seed 0

writes ``items_shuffle.json`` (products), ``items_ins_v2.json`` (attributes and base
instructions) and ``goals.json`` (goals with their train/eval split) to DIR, which
`hiper_envs.webshop.loader.load_data_dir` (and the environment's ``data_dir``) reads back.

Each product is one of the product types of `hiper_envs.webshop.vocab` (five categories,
twenty types) with a brand, three or four attributes from the type's pool, a subset of the
type's option values (sizes priced in steps) and a base price. Each product gets one goal by
default: one or two of its attributes, one value per option group and WebShop's price limit
rule applied to the price of that choice, e.g. "i need a sulfate free shampoo for dry hair
with scent: lavender, and size: 16 fl oz, and price lower than 30.00 dollars". Goals are split
by product, so eval goals never target a product that a train goal targets, and no eval
instruction equals a train instruction.

Text length is set by `verbosity`: ``"short"`` (the default, for small models on CPU: a
one-sentence description, one bullet per attribute, one review) or ``"long"`` (three
sentences, extra feature bullets, three reviews).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from collections.abc import Iterator
from typing import Any, Literal

from tqdm import tqdm

from hiper_envs.webshop import vocab
from hiper_envs.webshop.loader import GOALS_FILE, price_limit
from hiper_envs.webshop.schema import NO_PRICE_LIMIT, Goal

Verbosity = Literal["short", "long"]


@dataclasses.dataclass(frozen=True)
class CatalogConfig:
    """What to generate. Supported sizes: a few hundred to 100k products."""

    num_products: int = 1000
    seed: int = 0
    eval_fraction: float = 0.2
    goals_per_product: int = 1
    max_goal_attributes: int = 2
    verbosity: Verbosity = "short"

    def __post_init__(self) -> None:
        if not 1 <= self.num_products <= 1_000_000:
            raise ValueError(f"num_products must be in [1, 1000000], got {self.num_products}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.goals_per_product < 0:
            raise ValueError(f"goals_per_product must be >= 0, got {self.goals_per_product}")
        if self.max_goal_attributes < 1:
            raise ValueError(f"max_goal_attributes must be >= 1, got {self.max_goal_attributes}")
        if self.verbosity not in ("short", "long"):
            raise ValueError(f"verbosity must be 'short' or 'long', got {self.verbosity!r}")


@dataclasses.dataclass(frozen=True)
class GeneratedCatalog:
    """Raw records in the official formats, plus the goals (`Goal`, with splits)."""

    products: list[dict[str, Any]]
    attributes: dict[str, dict[str, Any]]
    goals: list[Goal]


_SMALL_WORDS = frozenset({"for", "with", "and", "of"})
_ASIN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _title_case(text: str) -> str:
    return " ".join(
        word if word in _SMALL_WORDS else "-".join(part[:1].upper() + part[1:] for part in word.split("-"))
        for word in text.split()
    )


def _new_asin(rng: random.Random, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choices(_ASIN_CHARS, k=8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _brand(rng: random.Random) -> str:
    return rng.choice(vocab.BRAND_PREFIXES) + rng.choice(vocab.BRAND_SUFFIXES)


def _unique_attributes(kind: vocab.ProductType) -> list[vocab.Attribute]:
    seen: dict[str, vocab.Attribute] = {}
    for attribute in kind.attributes:
        seen.setdefault(attribute.phrase, attribute)
    return list(seen.values())


def _product_record(
    rng: random.Random, asin: str, category: vocab.Category, kind: vocab.ProductType, verbosity: Verbosity
) -> tuple[dict[str, Any], list[vocab.Attribute]]:
    brand = _brand(rng)
    attributes = rng.sample(_unique_attributes(kind), rng.choice((3, 4)))
    pre = next((a.text for a in attributes if a.before_noun), "")
    post = next((a.text for a in attributes if not a.before_noun), "")
    title = _title_case(" ".join(part for part in (brand, pre, kind.noun, post) if part))

    options: dict[str, list[dict[str, Any]]] = {}
    max_extra = 0.0
    for group in kind.options:
        count = rng.randint(2, min(4, len(group.values)))
        chosen = sorted(rng.sample(range(len(group.values)), count))
        entries = [{"value": group.values[i], "image": None} for i in chosen]
        if group.price_steps:
            floor = min(group.price_steps[i] for i in chosen)
            for entry, i in zip(entries, chosen, strict=True):
                entry["price_delta"] = float(group.price_steps[i] - floor)
            max_extra += max(entry["price_delta"] for entry in entries)
        options[group.name] = entries

    low, high = kind.price_range
    price = int(rng.uniform(low, high)) + 0.99
    pricing = f"${price:.2f}" if max_extra == 0 else f"${price:.2f} - ${price + max_extra:.2f}"

    features = list(kind.features)
    rng.shuffle(features)
    bullets = [a.text[:1].upper() + a.text[1:] for a in attributes]
    sentences = [f"{brand} {kind.noun}, {features[0]}."]
    n_reviews = 1
    if verbosity == "long":
        bullets += [f[:1].upper() + f[1:] for f in features[1:]]
        sentences += [
            f"Made to be {' and '.join(a.text for a in attributes[:2])}.",
            f"Our customers like it: {features[1]}.",
        ]
        n_reviews = 3
    reviews = [
        {
            "title": rng.choice(vocab.REVIEW_TITLES),
            "score": rng.randint(3, 5),
            "body": rng.choice(category.review_words) + ".",
        }
        for _ in range(n_reviews)
    ]
    record = {
        "asin": asin,
        "name": title,
        "category": category.name,
        "query": kind.query,
        "product_category": kind.path,
        "full_description": " ".join(sentences),
        "small_description": bullets,
        "pricing": pricing,
        "customization_options": options,
        "images": [],
        "reviews": reviews,
        "rating": f"{sum(r['score'] for r in reviews) / len(reviews):.1f}",
    }
    return record, attributes


def _instruction(rng: random.Random, kind: vocab.ProductType, attributes: list[vocab.Attribute]) -> str:
    pre = " and ".join(a.text for a in attributes if a.before_noun)
    post = " ".join(a.text for a in attributes if not a.before_noun)
    phrase = " ".join(part for part in (pre, kind.noun, post) if part)
    article = "" if kind.plural else ("an " if phrase[0] in "aeiou" else "a ")
    return f"{rng.choice(vocab.INSTRUCTION_LEADS)} {article}{phrase}"


def _goal(
    rng: random.Random,
    record: dict[str, Any],
    kind: vocab.ProductType,
    attributes: list[vocab.Attribute],
    index: int,
    max_goal_attributes: int,
) -> Goal:
    wanted = rng.sample(attributes, rng.randint(1, min(max_goal_attributes, len(attributes))))
    base = _instruction(rng, kind, wanted)
    chosen = {name: rng.choice(entries) for name, entries in sorted(record["customization_options"].items())}
    price = float(record["pricing"].split(" - ")[0].lstrip("$")) + sum(
        entry.get("price_delta", 0.0) for entry in chosen.values()
    )
    limit = price_limit(price, rng)
    options = {name: entry["value"] for name, entry in chosen.items()}
    option_text = ", and ".join(f"{name}: {value}" for name, value in options.items())
    text = base + (f" with {option_text}" if option_text else "")
    text += "" if limit is None else f", and price lower than {limit:.2f} dollars"
    return Goal(
        goal_id=f"{record['asin']}-{index}",
        asin=record["asin"],
        instruction_text=text,
        category=record["category"],
        query=record["query"],
        name=record["name"],
        product_category=record["product_category"],
        attributes=tuple(a.phrase for a in wanted),
        goal_options=options,
        price_upper=NO_PRICE_LIMIT if limit is None else limit,
    )


def generate_records(
    config: CatalogConfig = CatalogConfig(), progress: bool = False
) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[Goal]]]:
    """One (raw product record, ``items_ins_v2`` entry, goals with their split) per product."""
    rng = random.Random(config.seed)
    kinds = [(category, kind) for category in vocab.CATEGORIES for kind in category.types]
    taken: set[str] = set()
    for _ in tqdm(range(config.num_products), desc="products", disable=not progress):
        category, kind = rng.choice(kinds)
        asin = _new_asin(rng, taken)
        record, product_attributes = _product_record(rng, asin, category, kind, config.verbosity)
        split = "eval" if rng.random() < config.eval_fraction else "train"
        goals = [
            dataclasses.replace(
                _goal(rng, record, kind, product_attributes, i, config.max_goal_attributes), split=split
            )
            for i in range(config.goals_per_product)
        ]
        entry = {
            "attributes": [a.phrase for a in product_attributes],
            "instruction": _instruction(rng, kind, product_attributes[:1]),
            "instruction_attributes": [product_attributes[0].phrase],
        }
        yield record, entry, goals


def split_goals(goals: list[Goal]) -> list[Goal]:
    """Train goals, then eval goals whose instruction text no train goal has (no duplicates)."""
    ordered = [g for g in goals if g.split == "train"] + [g for g in goals if g.split == "eval"]
    return _distinct_instructions(ordered)


def generate_catalog(config: CatalogConfig = CatalogConfig(), progress: bool = False) -> GeneratedCatalog:
    """Products (official raw records), attributes (``items_ins_v2`` entries) and goals."""
    products, attributes, goals = [], {}, []
    for record, entry, product_goals in generate_records(config, progress):
        products.append(record)
        attributes[record["asin"]] = entry
        goals.extend(product_goals)
    return GeneratedCatalog(products, attributes, split_goals(goals))


def _distinct_instructions(goals: list[Goal]) -> list[Goal]:
    """Keep the first goal of each instruction text (train goals come first)."""
    seen: set[str] = set()
    kept = []
    for goal in goals:
        if goal.instruction_text not in seen:
            seen.add(goal.instruction_text)
            kept.append(goal)
    return kept


def write_catalog(
    out_dir: str, config: CatalogConfig = CatalogConfig(), progress: bool = True
) -> GeneratedCatalog:
    """Generate and write ``items_shuffle.json``, ``items_ins_v2.json`` and ``goals.json``."""
    catalog = generate_catalog(config, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "items_shuffle.json": catalog.products,
        "items_ins_v2.json": catalog.attributes,
        GOALS_FILE: [goal.to_json() for goal in catalog.goals],
    }
    for name, content in files.items():
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)
        os.replace(tmp, os.path.join(out_dir, name))
    return catalog


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-products", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--goals-per-product", type=int, default=1)
    parser.add_argument("--max-goal-attributes", type=int, default=2)
    parser.add_argument("--verbosity", choices=("short", "long"), default="short")
    args = parser.parse_args(argv)
    config = CatalogConfig(
        num_products=args.num_products,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        goals_per_product=args.goals_per_product,
        max_goal_attributes=args.max_goal_attributes,
        verbosity=args.verbosity,
    )
    catalog = write_catalog(args.out, config)
    n_eval = sum(goal.split == "eval" for goal in catalog.goals)
    print(
        f"wrote {len(catalog.products)} products and {len(catalog.goals)} goals "
        f"({len(catalog.goals) - n_eval} train, {n_eval} eval) to {args.out}"
    )


if __name__ == "__main__":
    main()

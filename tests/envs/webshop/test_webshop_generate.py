"""The procedural catalog: reproducible, official format, solvable goals, disjoint splits."""

import collections
import itertools
import json

import pytest

from hiper_envs.webshop import generate, vocab
from hiper_envs.webshop.catalog import catalog_from_generated, get_catalog
from hiper_envs.webshop.generate import CatalogConfig, generate_catalog, write_catalog
from hiper_envs.webshop.loader import PRICE_STEPS, load_data_dir
from hiper_envs.webshop.nouns import lexicon_title_nouns
from hiper_envs.webshop.reward import option_reward, webshop_reward


@pytest.fixture(scope="module")
def catalog():
    return get_catalog(num_products=1000, seed=0)


def test_same_seed_same_catalog_other_seed_other_catalog():
    a = generate_catalog(CatalogConfig(num_products=300, seed=3))
    b = generate_catalog(CatalogConfig(num_products=300, seed=3))
    c = generate_catalog(CatalogConfig(num_products=300, seed=4))
    assert a == b
    assert a.products != c.products


def test_catalog_spans_categories_and_types(catalog):
    assert len(catalog.products) == 1000
    assert {p.category for p in catalog.products} == {c.name for c in vocab.CATEGORIES}
    assert len({p.query for p in catalog.products}) == sum(len(c.types) for c in vocab.CATEGORIES)
    assert len({p.asin for p in catalog.products}) == 1000
    assert all(len(p.asin) == 10 for p in catalog.products)


def test_every_goal_is_solvable_by_its_product(catalog):
    for goal in catalog.goals:
        product = catalog.by_asin[goal.asin]
        options = goal.options_dict()
        price = product.price_with(options)
        assert price <= goal.price_upper
        assert webshop_reward(product, goal, price, options, lexicon_title_nouns).reward == 1.0, goal


def test_price_limits_follow_webshops_rule(catalog):
    for goal in catalog.goals:
        price = catalog.by_asin[goal.asin].price_with(goal.options_dict())
        assert goal.price_upper in [p for p in PRICE_STEPS if p > price][1:4]
        assert f"price lower than {goal.price_upper:.2f} dollars" in goal.instruction_text


def test_goals_mention_their_attributes_and_options(catalog):
    for goal in catalog.goals[:200]:
        for name, value in goal.options_dict().items():
            assert f"{name}: {value}" in goal.instruction_text
        assert all(attribute in goal.instruction_text for attribute in goal.attributes)
        assert 1 <= len(goal.attributes) <= 2


def test_train_and_eval_share_no_goal_and_no_target_product(catalog):
    train, evaluation = catalog.goals_for("train"), catalog.goals_for("eval")
    assert 150 <= len(evaluation) <= 250 and len(train) + len(evaluation) == len(catalog.goals)
    assert not {g.asin for g in train} & {g.asin for g in evaluation}
    assert not {g.instruction_text for g in train} & {g.instruction_text for g in evaluation}
    assert len({g.goal_id for g in catalog.goals}) == len(catalog.goals)


def test_attributes_are_shared_so_search_words_alone_do_not_single_out_the_product(catalog):
    by_query = collections.defaultdict(list)
    for product in catalog.products:
        by_query[product.query].append(set(product.attributes))
    shared = []
    for goal in catalog.goals:
        same_kind = by_query[goal.query]
        shared.append(sum(set(goal.attributes) <= attributes for attributes in same_kind))
    assert sum(n >= 2 for n in shared) / len(shared) > 0.8


def test_option_values_tell_each_other_apart_under_webshops_option_reward():
    for kind in (k for c in vocab.CATEGORIES for k in c.types):
        for group in kind.options:
            assert not group.price_steps or len(group.price_steps) == len(group.values)
            for have, want in itertools.product(group.values, repeat=2):
                for goal_options in ({group.name: want}, (want,)):
                    matched = option_reward([have], goal_options)[1] == 1
                    assert matched == (have == want), (kind.query, have, want, goal_options)


def test_product_texts_are_short_by_default_and_longer_on_request():
    short = generate_catalog(CatalogConfig(num_products=300, seed=0))
    long = generate_catalog(CatalogConfig(num_products=300, seed=0, verbosity="long"))
    mean_words = lambda c: sum(len(p["full_description"].split()) for p in c.products) / len(c.products)  # noqa: E731
    assert mean_words(short) < 12 < mean_words(long)
    assert max(len(g.instruction_text.split()) for g in short.goals) <= 40
    assert max(len(p["name"].split()) for p in short.products) <= 10


def test_written_files_load_back_to_the_same_catalog(tmp_path):
    config = CatalogConfig(num_products=300, seed=5)
    write_catalog(str(tmp_path), config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "goals.json",
        "items_ins_v2.json",
        "items_shuffle.json",
    ]
    products, goals = load_data_dir(str(tmp_path))
    in_memory = catalog_from_generated(config)
    assert products == in_memory.products
    assert goals == in_memory.goals
    raw = json.loads((tmp_path / "items_shuffle.json").read_text())
    assert set(raw[0]) >= {
        "asin",
        "name",
        "category",
        "query",
        "product_category",
        "full_description",
        "small_description",
        "pricing",
        "customization_options",
        "images",
    }


def test_cli_writes_a_catalog(tmp_path, capsys):
    generate.main(["--out", str(tmp_path), "--num-products", "300", "--seed", "1"])
    assert "wrote 300 products" in capsys.readouterr().out
    products, goals = load_data_dir(str(tmp_path), num_products=100)
    assert len(products) == 100 and {g.asin for g in goals} <= {p.asin for p in products}


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_products"):
        CatalogConfig(num_products=0)
    with pytest.raises(ValueError, match="verbosity"):
        CatalogConfig(verbosity="huge")


@pytest.mark.slow
def test_hundred_thousand_products():
    catalog = generate_catalog(CatalogConfig(num_products=100_000, seed=0))
    assert len(catalog.products) == 100_000
    assert len({p["asin"] for p in catalog.products}) == 100_000

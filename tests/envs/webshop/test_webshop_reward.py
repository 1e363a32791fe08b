"""WebShop's reward, term by term, on hand-built products and goals (expected values by hand)."""

import dataclasses

import pytest

from hiper_envs.webshop.nouns import lexicon_title_nouns
from hiper_envs.webshop.reward import (
    COLOR_SET,
    attribute_reward,
    normalize_color,
    option_reward,
    token_set_ratio,
    type_reward,
    webshop_reward,
)
from hiper_envs.webshop.schema import Goal, Product


def words(title: str) -> list[str]:
    """A transparent stand-in tagger: every lower-cased word is a noun."""
    return title.lower().split()


def make_product(**changes) -> Product:
    base = Product(
        asin="B0PRODUCT1",
        title="Lumora Sulfate Free Shampoo",
        category="beauty",
        query="shampoo",
        product_category="Beauty › Hair Care › Shampoos",
        description="A gentle shampoo.",
        bullet_points=("Rich lather",),
        attributes=("sulfate free", "paraben free", "dry hair"),
        options={"size": ("8 fl oz", "16 fl oz"), "scent": ("lavender", "coconut")},
        price=10.0,
    )
    return dataclasses.replace(base, **changes)


def make_goal(**changes) -> Goal:
    base = Goal(
        goal_id="g-0",
        asin="B0PRODUCT1",
        instruction_text="i need a sulfate free shampoo",
        category="beauty",
        query="shampoo",
        name="Lumora Sulfate Free Shampoo",
        product_category="Beauty › Hair Care › Shampoos",
        attributes=("sulfate free", "dry hair"),
        goal_options={"size": "16 fl oz", "scent": "lavender"},
        price_upper=30.0,
    )
    return dataclasses.replace(base, **changes)


# --- fuzzy matching and colour normalisation ---------------------------------------------------
def test_token_set_ratio_follows_thefuzz_processing():
    assert token_set_ratio("Essential Oil!", "essential oil") == 100
    assert token_set_ratio("powder snow", "cool powder snow") == 100  # one token set inside the other
    assert token_set_ratio("essential oil", "essential oils") > 85
    assert token_set_ratio("tea bag", "tea tree") < 85
    assert token_set_ratio("", "anything") == 0
    assert token_set_ratio("café", "caf") == 100  # characters 128-255 are dropped first
    assert isinstance(token_set_ratio("a b", "b c"), int)


def test_normalize_color_takes_first_listed_colour_substring():
    assert normalize_color("black forest") == "black"
    assert normalize_color("violet lavender") == "lavender"  # 'lavender' precedes 'violet' in the list
    assert normalize_color("dark brown") == "brown"
    assert normalize_color("standard") == "tan"  # substring match, as WebShop
    assert normalize_color("webshop") == "webshop"
    assert normalize_color(("color", "black")) == "black"  # a pair matches whole entries only
    assert normalize_color(("color", "navy blue")) == ("color", "navy blue")
    assert len(COLOR_SET) == 102 and COLOR_SET[0] == "alabaster"


# --- type reward ---------------------------------------------------------------------------------
def test_type_reward_exact_match():
    result = type_reward(make_product(), make_goal(), words)
    assert (result.r_type, result.query_match, result.category_match, result.title_score) == (
        1.0,
        True,
        True,
        1.0,
    )


def test_type_reward_category_overlap_needs_two_levels_in_any_order():
    goal = make_goal(product_category="a › b › c")
    assert type_reward(make_product(product_category="c › b › x"), goal, words).category_match
    assert type_reward(make_product(product_category="a › a › b"), goal, words).category_match
    assert not type_reward(make_product(product_category="a › d › e"), goal, words).category_match


def test_type_reward_levels_from_title_overlap():
    goal = make_goal(
        query="q", product_category="x › y", name="one two three four five six seven eight nine ten"
    )
    other = dict(query="other", product_category="p › q")
    # 3 of 10 goal nouns shared: the overlap > 0.2 alone keeps r_type 1.
    assert type_reward(make_product(title="one two three", **other), goal, words).r_type == 1.0
    # 2 of 10: no query/category/title match -> 0.5.
    result = type_reward(make_product(title="one two", **other), goal, words)
    assert (result.r_type, result.title_score) == (0.5, 0.2)
    # 1 of 20 (< 0.1) -> 0.1; none -> 0.
    long_goal = make_goal(query="q", product_category="x › y", name=" ".join(f"w{i}" for i in range(20)))
    assert type_reward(make_product(title="w0 zzz", **other), long_goal, words).r_type == 0.1
    assert type_reward(make_product(title="zzz", **other), long_goal, words).r_type == 0.0
    # A query match does not rescue a title with no shared noun (WebShop applies that rule last).
    assert type_reward(make_product(title="zzz"), make_goal(), words).r_type == 0.0


def test_type_reward_goal_title_without_nouns_scores_point_two():
    result = type_reward(make_product(), make_goal(name="the of and"), lexicon_title_nouns)
    assert result.title_score == 0.2


# --- attribute reward ----------------------------------------------------------------------------
def test_attribute_reward_exact_fuzzy_partial_and_none():
    goal = make_goal(attributes=("tea tree", "essential oils", "natural ingredients"))
    exact = make_product(attributes=("tea tree", "essential oil", "natural ingredients"))
    assert attribute_reward(exact, goal) == (1.0, 3)
    partial = make_product(
        attributes=("essential oil", "natural ingredients"), title="", bullet_points=(), description=""
    )
    assert attribute_reward(partial, goal) == (pytest.approx(2 / 3), 2)
    none = make_product(
        attributes=("tea bag", "earl grey"),
        title="English tea",
        bullet_points=("calming",),
        description="Lipton",
    )
    assert attribute_reward(none, goal) == (0.0, 0)


def test_attribute_reward_falls_back_to_title_bullets_and_description():
    goal = make_goal(attributes=("tea tree", "essential oils", "natural ingredients"))
    product = make_product(
        attributes=(),
        title="Tea Tree Shampoo",
        bullet_points=("This shampoo has essential oils",),
        description="made with natural ingredients",
    )
    assert attribute_reward(product, goal) == (1.0, 3)


def test_attribute_reward_without_goal_attributes_is_none():
    assert attribute_reward(make_product(), make_goal(attributes=())) == (None, 0)


# --- option reward -------------------------------------------------------------------------------
def test_option_reward_lists_exact_partial_fuzzy_and_empty():
    assert option_reward(["pack of 12", "grey", "xl"], ["grey", "XL", "pack of 12"]) == (1.0, 3)
    assert option_reward(["pack of 12", "blue", "xl"], ["grey", "XL", "pack of 12"]) == (
        pytest.approx(2 / 3),
        2,
    )
    assert option_reward(["pack of 12", "powder snow", "xl"], ["cool powder snow", "XL", "pack of 12"]) == (
        1.0,
        3,
    )
    assert option_reward(["goal 1"], []) == (None, 0)
    assert option_reward([], ["goal 1", "goal 2"]) == (0.0, 0)


def test_option_reward_normalises_colours():
    assert option_reward(["navy blue"], ["light blue"]) == (1.0, 1)  # both become 'blue'
    assert option_reward(["black"], ["white"]) == (0.0, 0)


def test_option_reward_mapping_compares_name_value_pairs():
    assert option_reward(["16 fl oz", "lavender"], {"size": "16 fl oz", "scent": "lavender"}) == (1.0, 2)
    assert option_reward(["8 fl oz", "lavender"], {"size": "16 fl oz", "scent": "lavender"}) == (0.5, 1)
    # WebShop quirks kept on purpose: the name joins the value's tokens ...
    assert option_reward(["large"], {"size": "x-large"}) == (1.0, 1)
    # ... and a pair is colour-normalised only on an exact colour name.
    assert option_reward(["blueberry"], {"flavor": "blueberry"}) == (0.0, 0)


# --- total ---------------------------------------------------------------------------------------
def reward(product=None, goal=None, price=20.0, options=None, tagger=words):
    options = {"size": "16 fl oz", "scent": "lavender"} if options is None else options
    return webshop_reward(product or make_product(), goal or make_goal(), price, options, tagger)


def test_total_reward_is_one_for_a_perfect_purchase():
    details = reward()
    assert details.reward == 1.0
    assert (details.r_att, details.r_option, details.r_price, details.r_type) == (1.0, 1.0, True, 1.0)
    assert details.w_att + details.w_option + details.w_price == pytest.approx(1.0)


def test_total_reward_missing_option():
    # 2 attributes + 1 of 2 options + price, over 2 + 2 + 1.
    assert reward(options={"size": "16 fl oz"}).reward == pytest.approx(4 / 5)
    assert reward(options={}).reward == pytest.approx(3 / 5)


def test_total_reward_price_above_limit():
    details = reward(price=30.01)
    assert details.r_price is False
    assert details.reward == pytest.approx(4 / 5)
    assert reward(price=30.0).reward == 1.0  # the limit itself is allowed


def test_total_reward_partial_attributes_and_more_options():
    product = make_product(attributes=(), bullet_points=(), description="made with natural ingredients")
    goal = make_goal(
        attributes=("tea tree", "essential oils", "natural ingredients"),
        goal_options={"color": "grey", "size": "XL", "amount": "pack of 12"},
        price_upper=40.0,
    )
    options = {"color": "grey", "size": "XL"}
    # 1 attribute + 2 options + price over 3 + 3 + 1, type match through query and category.
    assert webshop_reward(product, goal, 35.0, options, words).reward == pytest.approx(4 / 7)
    # A type mismatch (other query and category, 2 of 10 title nouns) halves it.
    goal = dataclasses.replace(goal, name="one two three four five six seven eight nine ten")
    mismatch = dataclasses.replace(product, query="other", product_category="a › d", title="one two")
    assert webshop_reward(mismatch, goal, 35.0, options, words).reward == pytest.approx(4 / 7 * 0.5)


def test_total_reward_type_zero_zeroes_everything():
    product = make_product(
        title="Completely Different Cabinet Knob", query="knob", product_category="Tools › Knobs"
    )
    assert reward(product=product).reward == 0.0


def test_total_reward_without_price_limit_counts_price_as_met():
    assert reward(goal=make_goal(price_upper=0.0), price=1e9).reward == 1.0


def test_total_reward_with_lexicon_tagger_on_a_real_title():
    goal = make_goal(name="Lumora Sulfate Free Argan Oil Shampoo for Dry Hair, 16 oz")
    product = make_product(title="Solento Paraben Free Argan Oil Shampoo")
    details = reward(product=product, goal=goal, tagger=lexicon_title_nouns)
    # goal nouns: lumora sulfate argan oil shampoo hair oz (7); shared: argan oil shampoo.
    assert details.title_score == pytest.approx(3 / 7)
    assert details.reward == 1.0

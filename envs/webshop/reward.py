"""WebShop's purchase reward (``web_agent_site/engine/goal.py``), reimplemented.

    reward = (attribute matches + option matches + [price <= price_upper])
             / (n_goal_attributes + n_goal_options + 1) * r_type

- r_type (`type_reward`): 1 when the purchased product's query equals the goal's, or their
  ``product_category`` paths share >= 2 levels, or the title-noun overlap is > 0.2; else 0.5;
  then 0.1 when the overlap is < 0.1 and 0 when it is 0. The overlap is
  |set(purchased nouns) & set(goal nouns)| / len(goal nouns) (goal nouns counted with
  repeats; 0.2 when the goal title has no noun).
- attributes (`attribute_reward`): a goal attribute matches when its fuzzy token-set ratio
  with one of the product's attributes is > 85, else when it is a substring of the lower-cased
  title, bullet points or description.
- options (`option_reward`): both sides pass through WebShop's colour normalisation, then a
  goal option matches when some purchased option has fuzzy token-set ratio > 85 with it.
  Goal options given as a mapping are compared as (name, value) pairs, as WebShop does when it
  iterates ``goal_options.items()``: the name joins the value's tokens, and colour
  normalisation of a pair only fires on an exact colour name.

Fuzzy ratios follow thefuzz: each side is pre-processed (characters 128-255 dropped,
non-word characters to spaces, lower-cased, stripped), the score is rounded to an integer.
Known differences from the original, all deliberate:
- the ratio is rapidfuzz's normalised InDel similarity (what thefuzz >= 0.20 and thefuzz with
  python-Levenshtein compute); thefuzz 0.19 without python-Levenshtein, as WebShop's
  requirements pin it, uses difflib's SequenceMatcher, which differs by a few points on some
  strings;
- a goal with no attributes gets r_att None (the original divides by zero), and a goal whose
  ``price_upper`` is <= 0 counts the price term as met (the original adds None and fails);
- title nouns come from spaCy's ``en_core_web_sm`` only when it is installed, else from the
  lexicon tagger of `hiper_envs.webshop.nouns` (reported as ``pos_tagger``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

from rapidfuzz import fuzz

from hiper_envs.webshop.schema import Goal, GoalOptions, Product

FUZZY_MATCH_THRESHOLD = 85

# WebShop's colour vocabulary (normalize.py), in its order: the first entry found wins.
COLOR_SET = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze "
    "brown burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas "
    "coffee cognac copper coral cranberry cream crystal dark denim eggplant elephant espresso "
    "fuchsia gold granite grape graphite grass gray green grey heather indigo ivory ivy khaki "
    "lavender lemon leopard light lilac lime magenta maroon mauve merlot midnight mint mocha "
    "multicolor mushroom mustard natural navy nude olive orange peach pewter pink plum purple "
    "rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone "
    "stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow"
).split()

_HIGH_LATIN1 = {code: None for code in range(128, 256)}
_NON_WORD = re.compile(r"(?ui)\W")


def fuzzy_process(text: str) -> str:
    """thefuzz's ``full_process(text, force_ascii=True)``."""
    return _NON_WORD.sub(" ", str(text).translate(_HIGH_LATIN1)).lower().strip()


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz's ``fuzz.token_set_ratio`` (0-100, integer) computed with rapidfuzz."""
    a, b = fuzzy_process(a), fuzzy_process(b)
    if not a or not b:
        return 0
    return int(round(fuzz.token_set_ratio(a, b)))


def normalize_color(option: str | tuple[str, str]) -> str | tuple[str, str]:
    """First WebShop colour contained in `option`; for a (name, value) pair, equal to one of them."""
    for color in COLOR_SET:
        if color in option:
            return color
    return option


def _option_text(option: str | tuple[str, str]) -> str:
    return option if isinstance(option, str) else " ".join(option)


@dataclasses.dataclass(frozen=True)
class TypeReward:
    r_type: float
    query_match: bool
    category_match: bool
    title_score: float


@dataclasses.dataclass(frozen=True)
class RewardDetails:
    """The reward and its terms (WebShop's ``verbose`` info); weights sum to 1 with the price."""

    reward: float
    r_type: float
    r_att: float | None
    w_att: float
    r_option: float | None
    w_option: float
    r_price: bool
    w_price: float
    query_match: bool
    category_match: bool
    title_score: float
    price: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _category_levels(path: str) -> set[str]:
    return {level.strip() for level in path.split("›")}


def type_reward(purchased: Product, goal: Goal, title_nouns: Callable[[str], list[str]]) -> TypeReward:
    """Is the purchased product the goal's kind of product? (query, category path, title nouns)."""
    query_match = purchased.query == goal.query
    category_match = (
        len(_category_levels(purchased.product_category) & _category_levels(goal.product_category)) >= 2
    )
    purchased_nouns = title_nouns(purchased.title)
    desired_nouns = title_nouns(goal.name)
    if not desired_nouns:
        title_score = 0.2
    else:
        title_score = len(set(purchased_nouns) & set(desired_nouns)) / len(desired_nouns)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return TypeReward(r_type, query_match, category_match, title_score)


def attribute_reward(purchased: Product, goal: Goal) -> tuple[float | None, int]:
    """(fraction of goal attributes matched or None without any, number matched)."""
    title = purchased.title.lower()
    bullets = " ".join(purchased.bullet_points).lower()
    description = purchased.description.lower()
    matches = 0
    for wanted in goal.attributes:
        if any(token_set_ratio(have, wanted) > FUZZY_MATCH_THRESHOLD for have in purchased.attributes):
            matches += 1
        elif wanted in title or wanted in bullets or wanted in description:
            matches += 1
    if not goal.attributes:
        return None, 0
    return matches / len(goal.attributes), matches


def option_reward(purchased_options: Sequence[str], goal_options: GoalOptions) -> tuple[float | None, int]:
    """(fraction of goal options matched or None without any, number matched)."""
    wanted_options = list(goal_options.items()) if isinstance(goal_options, Mapping) else list(goal_options)
    have = [_option_text(normalize_color(option)) for option in purchased_options]
    matches = 0
    for wanted in wanted_options:
        wanted_text = _option_text(normalize_color(wanted))
        if any(token_set_ratio(option, wanted_text) > FUZZY_MATCH_THRESHOLD for option in have):
            matches += 1
    if not wanted_options:
        return None, 0
    return matches / len(wanted_options), matches


def webshop_reward(
    purchased: Product,
    goal: Goal,
    price: float,
    options: Mapping[str, str],
    title_nouns: Callable[[str], list[str]],
) -> RewardDetails:
    """WebShop's reward in [0, 1] for buying `purchased` at `price` with `options` ({name: value})."""
    kind = type_reward(purchased, goal, title_nouns)
    r_price = price <= goal.price_upper if goal.price_upper > 0 else True
    r_att, n_att = attribute_reward(purchased, goal)
    r_option, n_option = option_reward(list(options.values()), goal.goal_options)
    denominator = len(goal.attributes) + len(goal.goal_options) + 1
    reward = (n_att + n_option + int(r_price)) / denominator * kind.r_type
    return RewardDetails(
        reward=reward,
        r_type=kind.r_type,
        r_att=r_att,
        w_att=len(goal.attributes) / denominator,
        r_option=r_option,
        w_option=len(goal.goal_options) / denominator,
        r_price=bool(r_price),
        w_price=1 / denominator,
        query_match=kind.query_match,
        category_match=kind.category_match,
        title_score=kind.title_score,
        price=float(price),
    )

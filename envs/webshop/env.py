"""`WebShopEnv`: the WebShop text environment as a gymnasium env (``hiper/WebShop-v0``).

    import gymnasium, hiper_envs  # importing hiper_envs registers the ids
    env = gymnasium.make("hiper/WebShop-v0", num_products=1000, split="eval")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("search[sulfate free shampoo]")

Observations and actions are strings. ``info`` carries ``admissible_actions`` (the page's
clickables as ``click[...]`` and, on the search page, ``search[<your query>]``), ``invalid``
(the action was not valid on the page; the page is unchanged), ``won`` (the purchase scored
WebShop reward 1), ``task`` (the instruction), ``task_type`` (the goal's product category),
``score`` (WebShop reward x 100, set on purchase), ``reward_details`` (the reward's terms),
``goal_id``, ``page`` and ``pos_tagger`` (which title-noun tagger the reward uses). The reward
is `success_reward` (10, HiPER's setting) on a won purchase and 0 otherwise, or WebShop's reward
itself with ``reward_type="score"``. Episodes end on "buy now" and are truncated after
`max_steps` actions (15). As in ALFWorld, ``step`` before the first ``reset`` or after the
episode ended (either way) raises ``RuntimeError`` until ``reset`` is called.

The catalog is generated (``num_products``, default 1000; ``catalog_seed``; ``verbosity``) or
read from ``data_dir`` (official WebShop files or generated ones; ``num_products`` keeps the
first N, default all) inside the process that builds the env, once per process; pickling an
env sends its constructor arguments and episode state only.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium

from hiper_envs.spaces import TextSpace

from hiper_envs.webshop import pages
from hiper_envs.webshop.catalog import SPLITS, Catalog, get_catalog
from hiper_envs.webshop.generate import CatalogConfig
from hiper_envs.webshop.nouns import TaggerChoice, get_title_noun_tagger
from hiper_envs.webshop.reward import RewardDetails, webshop_reward
from hiper_envs.webshop.schema import Goal

WIN_THRESHOLD = 1.0 - 1e-9


class WebShopEnv(gymnasium.Env[str, str]):
    """WebShop's text environment; see the module docstring for the observation/info contract."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        data_dir: str | None = None,
        num_products: int | None = None,
        catalog_seed: int = 0,
        split: str = "train",
        human_goals: bool = True,
        verbosity: Literal["short", "long"] = "short",
        eval_fraction: float = 0.2,
        max_steps: int = 15,
        reward_type: Literal["success", "score"] = "success",
        success_reward: float = 10.0,
        show_instruction: bool = True,
        pos_tagger: TaggerChoice = "auto",
        render_mode: str | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if reward_type not in ("success", "score"):
            raise ValueError(f"reward_type must be 'success' or 'score', got {reward_type!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self._kwargs = dict(
            data_dir=data_dir,
            num_products=num_products,
            catalog_seed=catalog_seed,
            split=split,
            human_goals=human_goals,
            verbosity=verbosity,
            eval_fraction=eval_fraction,
            max_steps=max_steps,
            reward_type=reward_type,
            success_reward=success_reward,
            show_instruction=show_instruction,
            pos_tagger=pos_tagger,
            render_mode=render_mode,
        )
        self.split = split
        self.max_steps = max_steps
        self.reward_type = reward_type
        self.success_reward = success_reward
        self.show_instruction = show_instruction
        self.render_mode = render_mode
        self.pos_tagger_name, self.title_nouns = get_title_noun_tagger(pos_tagger)
        self.catalog = self._load_catalog()
        self.goals = self.catalog.goals_for(split)
        if not self.goals:
            raise ValueError(f"the catalog ({self.catalog.source}) has no {split!r} goals")
        self.observation_space = TextSpace()
        self.action_space = TextSpace()
        self.goal: Goal = self.goals[0]
        self.goal_index = 0
        self.session = pages.Session()
        self.num_steps = 0
        self._details: RewardDetails | None = None
        self._ended: bool | None = None  # None: never reset

    def _load_catalog(self) -> Catalog:
        k = self._kwargs
        if k["data_dir"] is not None:
            return get_catalog(
                data_dir=k["data_dir"],
                num_products=k["num_products"],
                seed=k["catalog_seed"],
                human_goals=k["human_goals"],
            )
        config = CatalogConfig(
            num_products=k["num_products"] or 1000,
            seed=k["catalog_seed"],
            eval_fraction=k["eval_fraction"],
            verbosity=k["verbosity"],
        )
        return get_catalog(config=config)

    # --- gymnasium API -------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start an episode on a random goal of the split, or ``options={"goal_index": i}`` /
        ``{"goal_id": "..."}``."""
        super().reset(seed=seed)
        options = options or {}
        if "goal_id" in options:
            matches = [i for i, goal in enumerate(self.goals) if goal.goal_id == options["goal_id"]]
            if not matches:
                raise ValueError(f"no goal {options['goal_id']!r} in split {self.split!r}")
            self.goal_index = matches[0]
        elif "goal_index" in options:
            index = int(options["goal_index"])
            if not 0 <= index < len(self.goals):
                raise ValueError(f"goal_index must be in [0, {len(self.goals)}), got {index}")
            self.goal_index = index
        else:
            self.goal_index = int(self.np_random.integers(len(self.goals)))
        self.goal = self.goals[self.goal_index]
        self.session = pages.Session()
        self.num_steps = 0
        self._details = None
        self._ended = False
        return self._observation(), self._info(invalid=False)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply one action; invalid actions (any string at all) leave the page unchanged."""
        if self._ended is None:
            raise RuntimeError("call reset() before step()")
        if self._ended:
            raise RuntimeError("the episode has ended; call reset()")
        self.num_steps += 1
        valid = pages.step(self.session, self.catalog, action)
        reward = 0.0
        if valid and self.session.page == "done":
            self._details = self._score_purchase()
            won = self._details.reward >= WIN_THRESHOLD
            reward = (
                (self.success_reward if won else 0.0)
                if self.reward_type == "success"
                else self._details.reward
            )
        terminated = self.session.page == "done"
        truncated = not terminated and self.num_steps >= self.max_steps
        self._ended = terminated or truncated
        return self._observation(), float(reward), terminated, truncated, self._info(invalid=not valid)

    def render(self) -> str | None:
        return self._observation() if self.render_mode == "ansi" else None

    # --- helpers -------------------------------------------------------------------------
    def _score_purchase(self) -> RewardDetails:
        product = self.catalog.by_asin[self.session.asin]
        price = product.price_with(self.session.options)
        return webshop_reward(product, self.goal, price, self.session.options, self.title_nouns)

    def _observation(self) -> str:
        score = self._details.reward if self._details else 0.0
        return pages.render(
            self.session, self.catalog, self.goal.instruction_text, self.show_instruction, score
        )

    def _info(self, invalid: bool) -> dict[str, Any]:
        details = self._details
        return {
            "admissible_actions": pages.admissible_actions(self.session, self.catalog),
            "invalid": invalid,
            "won": bool(details is not None and details.reward >= WIN_THRESHOLD),
            "task": self.goal.instruction_text,
            "task_type": self.goal.category,
            "score": 100.0 * details.reward if details else 0.0,
            "reward_details": details.to_dict() if details else {},
            "goal_id": self.goal.goal_id,
            "goal_index": self.goal_index,
            "page": self.session.page,
            "num_steps": self.num_steps,
            "purchased": {"asin": self.session.asin, "options": dict(self.session.options)}
            if self.session.purchased
            else {},
            "pos_tagger": self.pos_tagger_name,
        }

    # --- pickling: constructor arguments and episode state, never the catalog ---------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "kwargs": self._kwargs,
            "episode": (self.goal_index, self.session, self.num_steps, self._details, self._ended),
            "np_random": self._np_random,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["kwargs"])
        self.goal_index, self.session, self.num_steps, self._details, self._ended = state["episode"]
        self.goal = self.goals[self.goal_index]
        self._np_random = state["np_random"]

"""Scripted WebShop policies (oracle, random, search-and-buy-first) and oracle demonstrations.

    python -m hiper_envs.webshop.demos --out demos.jsonl --split train --num-products 1000

plays the oracle on every goal of the split (or ``--episodes N`` of them) and writes one JSON
line per episode:

    {"env": "webshop", "game": goal id, "task_type": category, "task": instruction,
     "won": bool, "num_turns": N,
     "turns": [{"observation": page text before acting, "admissible_actions": [...],
                "switch": "SWITCH" | "KEEP", "subgoal": "...", "action": "...",
                "reward": float, "done": bool}, ...]}

The oracle searches with the instruction, opens the goal product (or another product that
scores 1) from the results, paging with "next >" if needed (and searching the product's
title if it is not among the 50 results), selects the goal options and buys. Each action
comes with a subgoal ("search for the product", "look through the results", "open the
matching product", "select size large", "buy the product"); a turn is SWITCH when its subgoal
differs from the previous turn's, so the first turn is SWITCH.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from typing import Any, Protocol

import gymnasium
from tqdm import tqdm

from hiper_envs.webshop import pages
from hiper_envs.webshop.env import WIN_THRESHOLD, WebShopEnv
from hiper_envs.webshop.reward import option_reward, webshop_reward
from hiper_envs.webshop.schema import Goal, Product

SUBGOAL_SEARCH = "search for the product"
SUBGOAL_SEARCH_TITLE = "search for the product by its title"
SUBGOAL_BROWSE = "look through the results"
SUBGOAL_OPEN = "open the matching product"
SUBGOAL_BACK = "go back to the results"
SUBGOAL_BUY = "buy the product"


class Policy(Protocol):
    def reset(self, env: WebShopEnv) -> None: ...

    def act(self, env: WebShopEnv, observation: str, info: dict[str, Any]) -> tuple[str, str]:
        """(action, subgoal) for the current page."""
        ...


def best_options(product: Product, goal: Goal) -> dict[str, str]:
    """For each option of `product`, the value that matches the goal (if any does)."""
    wanted = goal.options_dict()
    chosen = {}
    for name, values in product.options.items():
        if wanted.get(name) in values:
            chosen[name] = wanted[name]
            continue
        for value in values:
            if option_reward([value], goal.goal_options)[1] > 0:
                chosen[name] = value
                break
    return chosen


def achievable_reward(env: WebShopEnv, product: Product) -> float:
    """WebShop reward of buying `product` with its best options for the env's goal."""
    options = best_options(product, env.goal)
    return webshop_reward(product, env.goal, product.price_with(options), options, env.title_nouns).reward


class OraclePolicy:
    """Knows the goal: search, find a product scoring 1, choose its options, buy."""

    def reset(self, env: WebShopEnv) -> None:
        self.searches = 0
        self.target: str | None = None

    def _target_on_page(self, env: WebShopEnv) -> str | None:
        asins = env.session.page_asins()
        if env.goal.asin in asins:
            return env.goal.asin
        rewards = {asin: achievable_reward(env, env.catalog.by_asin[asin]) for asin in asins}
        best = max(rewards, key=rewards.get, default=None)
        out_of_searches = self.searches >= 2 and not env.session.has_next_page()
        if best is not None and (rewards[best] >= WIN_THRESHOLD or out_of_searches):
            return best
        return None

    def act(self, env: WebShopEnv, observation: str, info: dict[str, Any]) -> tuple[str, str]:
        session = env.session
        if session.page == "search":
            self.searches += 1
            if self.searches == 1:
                return f"search[{env.goal.instruction_text}]", SUBGOAL_SEARCH
            return f"search[{env.goal.name}]", SUBGOAL_SEARCH_TITLE
        if session.page == "results":
            target = self._target_on_page(env)
            if target is not None:
                self.target = target
                return f"click[{target.lower()}]", SUBGOAL_OPEN
            if session.has_next_page():
                return f"click[{pages.NEXT_PAGE}]", SUBGOAL_BROWSE
            return f"click[{pages.BACK_TO_SEARCH}]", SUBGOAL_SEARCH_TITLE
        if session.page == "item":
            if session.asin != self.target:
                return f"click[{pages.PREV_PAGE}]", SUBGOAL_BACK
            product = env.catalog.by_asin[session.asin]
            for name, value in best_options(product, env.goal).items():
                if session.options.get(name) != value:
                    return f"click[{value}]", f"select {name} {value}"
            return f"click[{pages.BUY_NOW}]", SUBGOAL_BUY
        return f"click[{pages.PREV_PAGE}]", SUBGOAL_BACK


class RandomPolicy:
    """Uniform over the admissible actions; searches with three random words of the instruction."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def reset(self, env: WebShopEnv) -> None:
        pass

    def act(self, env: WebShopEnv, observation: str, info: dict[str, Any]) -> tuple[str, str]:
        action = self.rng.choice(info["admissible_actions"])
        if action == pages.SEARCH_ACTION:
            words = env.goal.instruction_text.split()
            action = f"search[{' '.join(self.rng.sample(words, min(3, len(words))))}]"
        return action, "act at random"


class SearchBuyFirstPolicy:
    """Search the instruction text, open the first result, buy it (no options chosen)."""

    def reset(self, env: WebShopEnv) -> None:
        pass

    def act(self, env: WebShopEnv, observation: str, info: dict[str, Any]) -> tuple[str, str]:
        session = env.session
        if session.page == "search":
            return f"search[{env.goal.instruction_text}]", SUBGOAL_SEARCH
        if session.page == "results" and session.results:
            return f"click[{session.results[0].lower()}]", SUBGOAL_OPEN
        if session.page == "item":
            return f"click[{pages.BUY_NOW}]", SUBGOAL_BUY
        return f"click[{pages.BACK_TO_SEARCH}]", SUBGOAL_SEARCH


class SearchFirstWithOptionsPolicy:
    """Search the instruction text, open the first result, choose the goal's options, buy.

    How far search alone gets: it reads neither the results nor the product's price.
    """

    def reset(self, env: WebShopEnv) -> None:
        pass

    def act(self, env: WebShopEnv, observation: str, info: dict[str, Any]) -> tuple[str, str]:
        session = env.session
        if session.page == "item":
            product = env.catalog.by_asin[session.asin]
            for name, value in best_options(product, env.goal).items():
                if session.options.get(name) != value:
                    return f"click[{value}]", f"select {name} {value}"
            return f"click[{pages.BUY_NOW}]", SUBGOAL_BUY
        return SearchBuyFirstPolicy().act(env, observation, info)


POLICIES = {
    "oracle": OraclePolicy,
    "random": RandomPolicy,
    "search_buy_first": SearchBuyFirstPolicy,
    "search_first_with_options": SearchFirstWithOptionsPolicy,
}


def play_episode(env: WebShopEnv, policy: Policy, goal_index: int) -> dict[str, Any]:
    """Play one goal; the episode record of the demonstrations format."""
    observation, info = env.reset(options={"goal_index": goal_index})
    policy.reset(env)
    turns = []
    previous_subgoal = None
    done = False
    while not done:
        action, subgoal = policy.act(env, observation, info)
        next_observation, reward, terminated, truncated, next_info = env.step(action)
        done = terminated or truncated
        turns.append(
            {
                "observation": observation,
                "admissible_actions": info["admissible_actions"],
                "switch": "SWITCH" if subgoal != previous_subgoal else "KEEP",
                "subgoal": subgoal,
                "action": action,
                "reward": reward,
                "done": done,
            }
        )
        previous_subgoal = subgoal
        observation, info = next_observation, next_info
    return {
        "env": "webshop",
        "game": env.goal.goal_id,
        "task_type": env.goal.category,
        "task": env.goal.instruction_text,
        "won": bool(info["won"]),
        "num_turns": len(turns),
        "score": info["score"],
        "turns": turns,
    }


def run_policy(
    env: WebShopEnv, policy: Policy, goal_indices: Iterable[int], progress: bool = False
) -> Iterable[dict[str, Any]]:
    """Episode records of `policy` on the given goals of the env's split."""
    indices = list(goal_indices)
    for index in tqdm(indices, desc="episodes", disable=not progress):
        yield play_episode(env, policy, index)


def summarize(episodes: Iterable[dict[str, Any]]) -> dict[str, float]:
    """success rate, mean WebShop score (0-100) and mean turns over episode records."""
    episodes = list(episodes)
    n = max(len(episodes), 1)
    return {
        "episodes": len(episodes),
        "success_rate": sum(e["won"] for e in episodes) / n,
        "mean_score": sum(e["score"] for e in episodes) / n,
        "mean_turns": sum(e["num_turns"] for e in episodes) / n,
    }


def write_demonstrations(
    env: WebShopEnv, path: str, episodes: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Oracle demonstrations of the env's split (first `episodes` goals, or all) as JSONL."""
    count = len(env.goals) if episodes is None else min(episodes, len(env.goals))
    records = []
    with open(path, "w", encoding="utf-8") as f:
        for record in run_policy(env, OraclePolicy(), range(count), progress=progress):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            records.append(record)
    return summarize(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write oracle demonstrations of WebShop as JSONL.")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--split", choices=("train", "eval", "all"), default="train")
    parser.add_argument(
        "--episodes", type=int, default=None, help="first N goals of the split (default: all)"
    )
    parser.add_argument("--data-dir", default=None, help="official or generated data directory")
    parser.add_argument("--num-products", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="catalog seed")
    parser.add_argument("--verbosity", choices=("short", "long"), default="short")
    args = parser.parse_args(argv)
    env = gymnasium.make(
        "hiper/WebShop-v0",
        data_dir=args.data_dir,
        num_products=args.num_products,
        catalog_seed=args.seed,
        split=args.split,
        verbosity=args.verbosity,
    ).unwrapped
    stats = write_demonstrations(env, args.out, args.episodes)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()

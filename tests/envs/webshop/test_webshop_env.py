"""The gymnasium env: pages, action grammar, rewards, truncation, robustness, pickling."""

import copy
import multiprocessing
import pickle

import gymnasium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hiper_envs  # noqa: F401 - registers the ids
from hiper_envs.webshop.demos import best_options

INFO_KEYS = {
    "admissible_actions",
    "invalid",
    "won",
    "task",
    "task_type",
    "score",
    "reward_details",
    "pos_tagger",
}


def make(**kwargs):
    return gymnasium.make("hiper/WebShop-v0", num_products=1000, **kwargs)


@pytest.fixture()
def env():
    return make(split="eval")


def start(env, index=0):
    observation, info = env.reset(options={"goal_index": index})
    return env.unwrapped.goal, observation, info


def test_reset_shows_the_search_page(env):
    goal, observation, info = start(env)
    assert set(info) >= INFO_KEYS
    assert observation == f"WebShop [SEP] Instruction: [SEP] {goal.instruction_text} [SEP] Search"
    assert info["admissible_actions"] == ["search[<your query>]"]
    assert (info["task"], info["task_type"], info["invalid"], info["won"]) == (
        goal.instruction_text,
        goal.category,
        False,
        False,
    )
    assert info["pos_tagger"] in ("lexicon", "spacy:en_core_web_sm")


def test_reset_samples_goals_reproducibly(env):
    first = [env.reset(seed=7)[1]["goal_id"]] + [env.reset()[1]["goal_id"] for _ in range(5)]
    second = [env.reset(seed=7)[1]["goal_id"]] + [env.reset()[1]["goal_id"] for _ in range(5)]
    assert first == second and len(set(first)) > 1
    assert env.reset(options={"goal_id": first[2]})[1]["goal_id"] == first[2]


def test_walk_through_every_page(env):
    goal, _, _ = start(env)
    observation, reward, terminated, truncated, info = env.step(f"search[{goal.instruction_text}]")
    assert info["page"] == "results" and not info["invalid"]
    assert observation.startswith(
        f"Instruction: [SEP] {goal.instruction_text} [SEP] Back to Search "
        "[SEP] Page 1 (Total results: 50) [SEP] Next >"
    )
    results = env.unwrapped.session.results
    assert info["admissible_actions"] == ["click[back to search]", "click[next >]"] + [
        f"click[{a.lower()}]" for a in results[:10]
    ]
    observation, *_, info = env.step("click[Next >]")  # clickables match case-insensitively
    assert (
        "Page 2 (Total results: 50) [SEP] < Prev [SEP] Next >" in observation and results[10] in observation
    )
    observation, *_, info = env.step("click[< prev]")
    assert "Page 1" in observation
    product = env.unwrapped.catalog.by_asin[results[0]]
    observation, *_, info = env.step(f"click[{results[0]}]")
    assert info["page"] == "item"
    option_text = " [SEP] ".join(" [SEP] ".join([name, *values]) for name, values in product.options.items())
    assert (
        f"Back to Search [SEP] < Prev [SEP] {option_text} [SEP] {product.title} [SEP] Price: " in observation
    )
    assert observation.endswith(
        f"Rating: {product.rating} [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now"
    )
    assert info["admissible_actions"][-4:] == [
        "click[description]",
        "click[features]",
        "click[reviews]",
        "click[buy now]",
    ]
    observation, *_, info = env.step("click[description]")
    assert observation.endswith(f"< Prev [SEP] {product.description}")
    assert info["admissible_actions"] == ["click[back to search]", "click[< prev]"]
    env.step("click[< prev]")
    observation, *_ = env.step("click[features]")
    assert observation.endswith(" [SEP] ".join(product.bullet_points))
    env.step("click[< prev]")
    observation, *_ = env.step("click[reviews]")
    review = product.reviews[0]
    assert f'"{review.title}" [SEP] {review.score} [SEP] {review.body}' in observation
    env.step("click[< prev]")
    observation, *_, info = env.step("click[< prev]")  # item page -> the same results page
    assert info["page"] == "results" and "Page 1" in observation
    observation, *_, info = env.step("click[back to search]")
    assert info["page"] == "search" and observation.startswith("WebShop")


def test_buying_the_goal_product_with_its_options_wins(env):
    goal, _, _ = start(env, 3)
    env.unwrapped.session.results = [goal.asin]  # place the goal product on the results page
    env.unwrapped.session.page = "results"
    env.step(f"click[{goal.asin}]")
    for value in goal.options_dict().values():
        observation, *_, info = env.step(f"click[{value}]")
        assert not info["invalid"]
    product = env.unwrapped.catalog.by_asin[goal.asin]
    assert (
        f"Price: ${product.price_with(goal.options_dict()):.2f}" in observation
        or not product.option_price_deltas
    )
    observation, reward, terminated, truncated, info = env.step("click[buy now]")
    assert (reward, terminated, truncated, info["won"], info["score"]) == (10.0, True, False, True, 100.0)
    assert info["reward_details"]["reward"] == 1.0 and info["page"] == "done"
    assert observation.startswith("Thank you for shopping with us!")
    assert info["purchased"] == {"asin": goal.asin, "options": goal.options_dict()}
    # As in ALFWorld, the ended episode refuses further steps until reset.
    with pytest.raises(RuntimeError, match="the episode has ended; call reset"):
        env.step("click[buy now]")


def test_buying_without_options_scores_partially(env):
    goal, _, _ = start(env, 3)
    env.unwrapped.session.results, env.unwrapped.session.page = [goal.asin], "results"
    env.step(f"click[{goal.asin}]")
    _, reward, terminated, _, info = env.step("click[buy now]")
    n_terms = len(goal.attributes) + len(goal.goal_options) + 1
    assert terminated and reward == 0.0 and not info["won"]
    assert info["score"] == pytest.approx(100 * (n_terms - len(goal.goal_options)) / n_terms)


def test_score_reward_type_returns_webshops_reward():
    env = make(split="eval", reward_type="score")
    goal, _, _ = start(env, 3)
    env.unwrapped.session.results, env.unwrapped.session.page = [goal.asin], "results"
    env.step(f"click[{goal.asin}]")
    _, reward, *_, info = env.step("click[buy now]")
    assert 0 < reward < 1 and reward == pytest.approx(info["score"] / 100)


def test_invalid_actions_keep_the_page_and_say_so(env):
    _, observation, _ = start(env)
    for action in ["click[buy now]", "search[]", "buy", "", "click[next >]", "search[a", "jump[shampoo]"]:
        new_observation, reward, terminated, truncated, info = env.step(action)
        assert (new_observation, reward, terminated, info["invalid"]) == (observation, 0.0, False, True), (
            action
        )
    observation, *_, info = env.step("  SEARCH[ Shampoo ]  ")  # lenient on case and spaces
    assert not info["invalid"] and info["page"] == "results"
    new_observation, *_, info = env.step("search[shampoo]")  # no search bar on the results page
    assert info["invalid"] and new_observation == observation


def test_truncation_after_max_steps():
    env = make(split="eval", max_steps=15)
    start(env)
    for step in range(1, 16):
        *_, terminated, truncated, info = env.step("click[nothing]")
        assert not terminated and truncated == (step == 15)
    assert info["invalid"]
    # A truncated episode takes no more actions (a purchase at step 16 of 15 used to count).
    with pytest.raises(RuntimeError, match="the episode has ended; call reset"):
        env.step("search[shampoo]")
    env.reset(seed=0)
    *_, terminated, truncated, info = env.step("search[shampoo]")
    assert not (terminated or truncated) and not info["invalid"]


def test_step_before_reset_is_refused():
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        make(split="eval").unwrapped.step("search[shampoo]")


def test_instruction_can_be_left_out_of_pages():
    env = make(split="eval", show_instruction=False)
    goal, observation, _ = start(env)
    assert observation == "WebShop [SEP] Search"
    observation, *_ = env.step("search[shampoo]")
    assert goal.instruction_text not in observation and observation.startswith("Back to Search")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    actions=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.builds(
                lambda verb, arg: f"{verb}[{arg}]",
                st.sampled_from(["search", "click", "Click", "buy"]),
                st.text(max_size=20),
            ),
            st.sampled_from(
                [
                    "click[next >]",
                    "click[< prev]",
                    "click[back to search]",
                    "click[buy now]",
                    "click[description]",
                ]
            ),
        ),
        max_size=12,
    )
)
def test_any_string_is_safe(env, actions):
    _, _, info = start(env)
    for action in actions:
        admissible = info["admissible_actions"]
        observation, reward, terminated, truncated, info = env.step(action)
        assert isinstance(observation, str) and isinstance(reward, float) and set(info) >= INFO_KEYS
        assert info["invalid"] or action.strip().lower().startswith(("search", "click"))
        if action in admissible and action != "search[<your query>]" and not terminated:
            assert not info["invalid"]
        if terminated or truncated:
            break


def test_admissible_actions_are_all_valid(env):
    goal, _, _ = start(env, 5)
    walk = [f"search[{goal.instruction_text}]", "click[next >]", f"click[{goal.asin}]", "click[features]"]
    env.unwrapped.session.results = []
    for action in walk:
        if action == f"click[{goal.asin}]":
            env.unwrapped.session.results.insert(10, goal.asin)  # onto the current page
        *_, info = env.step(action)
        assert not info["invalid"], action
        saved = copy.deepcopy((env.unwrapped.session, env.unwrapped.num_steps))
        for admissible in info["admissible_actions"]:
            *_, step_info = env.step(admissible)
            assert not step_info["invalid"], (info["page"], admissible)
            env.unwrapped.session, env.unwrapped.num_steps = copy.deepcopy(saved)
            env.unwrapped._ended = False  # "buy now" ends the episode; this walk goes on


def test_best_options_pick_the_goal_values(env):
    goal, _, _ = start(env, 0)
    product = env.unwrapped.catalog.by_asin[goal.asin]
    assert best_options(product, goal) == goal.options_dict()


def test_pickles_as_arguments_and_episode_state(env):
    start(env, 4)
    env.step("search[shampoo]")
    blob = pickle.dumps(env.unwrapped)
    assert len(blob) < 10_000  # the catalog is not in it
    copy = pickle.loads(blob)
    assert copy.goal == env.unwrapped.goal and copy.session == env.unwrapped.session
    assert copy.step("click[back to search]")[-1]["page"] == "search"


def _make_in_worker(queue):
    import gymnasium

    # The "module:id" form imports hiper_envs (which registers the id) in the fresh process.
    env = gymnasium.make("hiper_envs:hiper/WebShop-v0", num_products=300, split="eval")
    observation, info = env.reset(seed=0)
    queue.put((observation, info["task"], env.step(f"search[{info['task']}]")[-1]["page"]))


def test_constructible_by_id_in_a_fresh_process():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_make_in_worker, args=(queue,))
    worker.start()
    observation, task, page = queue.get(timeout=120)
    worker.join(timeout=30)
    assert worker.exitcode == 0
    assert task in observation and page == "results"


def test_official_data_dir(tmp_path):
    import os

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "official_small")
    env = gymnasium.make("hiper/WebShop-v0", data_dir=fixture, split="all")
    observation, info = env.reset(options={"goal_id": "B07TESTSH1-0"})
    assert "coconut scent" in info["task"]
    observation, *_, info = env.step("search[sulfate free shampoo dry hair]")
    assert "B07TESTSH1" in observation
    env.step("click[b07testsh1]")
    env.step("click[coconut | lime]")
    env.step("click[12 fl oz]")
    *_, info = env.step("click[buy now]")
    assert info["won"] and info["score"] == 100.0


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="split"):
        make(split="test")
    with pytest.raises(ValueError, match="reward_type"):
        make(reward_type="dense")

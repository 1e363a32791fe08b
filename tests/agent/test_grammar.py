"""The response grammar's tables: alternatives, free text, KEEP copies, template slots, and
supervised targets that the constrained walk accepts."""

import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.agent.grammar import ALL, PAD, SET, TEXT, WILD, ResponseGrammar, allowed_sets, text_token_mask
from hiper_jax.agent.parsing import parse_response
from hiper_jax.agent.prompts import AgentView
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.sampling import DecodeConstraint, trace_constraint

ALFWORLD_ACTIONS = ["go to fridge 1", "go to cabinet 10", "go to cabinet 1", "open fridge 1",
                    "take apple 1 from countertop 2", "look", "inventory"]
WEBSHOP_ACTIONS = ["search[<your query>]"]
WEBSHOP_RESULTS = ["click[back to search]", "click[next >]", "click[< prev]", "click[b0123]"]


def make_grammar(tokenizer, style="plan_execute", max_text_tokens=12):
    table = TokenBytes(tokenizer)
    return ResponseGrammar(tokenizer, table, style, tokenizer.eos_token_id, max_text_tokens), table


def view(actions, subgoal=None):
    return AgentView(task="put an apple in the fridge", step=1, observation="You see a fridge 1.",
                     admissible_actions=actions, subgoal=subgoal)


def accepted(grammar, v, ids):
    """Whether the constrained walk allows every token of ``ids`` (``trace_constraint``)."""
    tables = grammar.tables([v], max_new_tokens=len(ids) + 8)
    constraint = DecodeConstraint(jnp.asarray(tables.alternatives), jnp.asarray(tables.text_budget),
                                  jnp.asarray(grammar.text_mask))
    allowed, text_on = trace_constraint(constraint, jnp.asarray([ids], jnp.int32), len(grammar.text_mask))
    mode, sets = allowed_sets(np.asarray(allowed[0]), np.asarray(text_on[0]), grammar.text_mask)
    for position, token in enumerate(ids):
        in_set = token in set(sets[position][sets[position] >= 0].tolist())
        in_text = mode[position] == TEXT and grammar.text_mask[token]
        if not (in_set or in_text or mode[position] == ALL):
            return False
    return True


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "qwen_tokenizer"])
def test_plan_execute_alternatives(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    grammar, table = make_grammar(tokenizer)
    tables = grammar.tables([view(ALFWORLD_ACTIONS), view(ALFWORLD_ACTIONS[:2], subgoal="find the apple")], 64)
    alternatives = tables.alternatives
    assert alternatives.dtype == np.int32 and alternatives.shape[0] == 2
    # Row 0 has no subgoal: KEEP and SWITCH both write one (a WILD), for every action.
    row = [list(a[a != PAD]) for a in alternatives[0] if (a != PAD).any()]
    assert len(row) == 2 * len(ALFWORLD_ACTIONS)
    assert all(a.count(WILD) == 1 and a[-1] == tokenizer.eos_token_id for a in row)
    texts = {table.decode([t for t in a if t >= 0]) for a in row}
    assert "<switch>SWITCH</switch><subgoal></subgoal><action>go to cabinet 10</action><|im_end|>" in texts
    # Row 1 has a subgoal: KEEP copies it literally (no WILD), SWITCH writes a new one.
    row = [list(a[a != PAD]) for a in alternatives[1] if (a != PAD).any()]
    keep = [a for a in row if WILD not in a]
    assert len(keep) == 2 and len(row) == 4
    assert table.decode(keep[0][:-1]) in {
        f"<switch>KEEP</switch><subgoal>find the apple</subgoal><action>{a}</action>" for a in ALFWORLD_ACTIONS[:2]}
    assert (alternatives[1, len(row):] == PAD).all()
    assert tables.text_budget.tolist() == [12, 12]


def test_flat_alternatives_and_template_slots(qwen_tokenizer):
    grammar, table = make_grammar(qwen_tokenizer, style="flat")
    tables = grammar.tables([view(WEBSHOP_ACTIONS), view(WEBSHOP_RESULTS)], 40)
    search = [t for t in tables.alternatives[0, 0] if t != PAD]
    assert search.count(WILD) == 1
    wild = search.index(WILD)
    assert table.decode(search[:wild]) == "<action>search["
    assert table.decode(search[wild + 1:-1]) == "]</action>"
    # The token that closes a slot is never a text token, so free text cannot run over it.
    assert not grammar.text_mask[search[wild + 1]]
    clicks = {table.decode([t for t in a if t not in (PAD, qwen_tokenizer.eos_token_id)])
              for a in tables.alternatives[1] if a[0] != PAD}
    assert clicks == {f"<action>{a}</action>" for a in WEBSHOP_RESULTS}


def test_budget_and_too_long_responses(tiny_tokenizer):
    grammar, _ = make_grammar(tiny_tokenizer, max_text_tokens=30)
    tables = grammar.tables([view(ALFWORLD_ACTIONS)], max_new_tokens=40)
    longest = max(int(np.sum((a >= 0))) for a in tables.alternatives[0])
    assert tables.text_budget[0] == min(30, 40 - longest)
    two_slots = ResponseGrammar(tiny_tokenizer, TokenBytes(tiny_tokenizer), "plan_execute",
                                tiny_tokenizer.eos_token_id, 30).tables([view(["search[<your query>]"])], 40)
    fixed = int(np.sum(two_slots.alternatives[0] >= 0, axis=1).max())
    assert two_slots.text_budget[0] == (40 - fixed) // 2  # a subgoal and a query
    with pytest.raises(ValueError, match="max_new_tokens=10"):
        grammar.tables([view(ALFWORLD_ACTIONS)], max_new_tokens=10)
    # KEEP copying a subgoal too long to fit is left out; SWITCH stays.
    long = view(ALFWORLD_ACTIONS[:1], subgoal=" ".join(["apple"] * 40))
    kept = grammar.tables([long], max_new_tokens=40).alternatives[0]
    assert sum((a != PAD).any() for a in kept) == 1 and WILD in kept[0]


def test_no_admissible_actions_leaves_the_row_unconstrained(tiny_tokenizer):
    grammar, _ = make_grammar(tiny_tokenizer, style="flat")
    tables = grammar.tables([view([])], 16)
    assert (tables.alternatives == PAD).all()
    ids = tiny_tokenizer.encode("anything at all", add_special_tokens=False)
    assert accepted(grammar, view([]), ids)


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "qwen_tokenizer"])
@pytest.mark.parametrize("switch,subgoal,current", [
    (True, "find the apple", None), (False, "find the apple", None),
    (True, "heat the apple", "find the apple"), (False, "find the apple", "find the apple")])
def test_supervised_targets_are_in_the_grammar(request, tokenizer_name, switch, subgoal, current):
    tokenizer = request.getfixturevalue(tokenizer_name)
    grammar, table = make_grammar(tokenizer)
    v = view(ALFWORLD_ACTIONS, subgoal=current)
    ids = grammar.response_ids(v, switch, subgoal, "take apple 1 from countertop 2")
    assert accepted(grammar, v, ids)
    parsed = parse_response(table.decode(ids))
    assert parsed.valid and parsed.action == "take apple 1 from countertop 2"
    assert parsed.subgoal == subgoal and parsed.is_switch == switch
    # An action that is not admissible is not in the grammar.
    assert not accepted(grammar, v, grammar.response_ids(v, switch, subgoal, "take apple 2 from sofa 1"))


def test_supervised_target_fills_a_template_slot(qwen_tokenizer):
    grammar, table = make_grammar(qwen_tokenizer, style="flat")
    v = view(WEBSHOP_ACTIONS)
    ids = grammar.response_ids(v, True, "", "search[blue running shoes]")
    assert table.decode(ids[:-1]) == "<action>search[blue running shoes]</action>"
    assert accepted(grammar, v, ids)
    assert not accepted(grammar, v, grammar.response_ids(v, True, "", "click[b0123]"))


def test_allowed_sets_are_distinct_and_count_each_token_once():
    text_mask = np.zeros(10, bool)
    text_mask[[1, 2, 3]] = True
    allowed = np.array([[4, 4, 10, 5], [10, 10, 10, 10], [2, 7, 10, 10], [6, 10, 6, 10]])
    text_on = np.array([False, False, True, False])
    mode, ids = allowed_sets(allowed, text_on, text_mask)
    assert mode.tolist() == [SET, ALL, TEXT, SET]
    assert ids.shape == (4, 2)
    assert ids.tolist() == [[4, 5], [-1, -1], [7, -1], [6, -1]]  # 2 is covered by the text mask


def test_text_mask_excludes_tags_brackets_and_special_tokens(qwen_tokenizer):
    mask = text_token_mask(TokenBytes(qwen_tokenizer), {int(i) for i in qwen_tokenizer.added_tokens_decoder})
    vocab = qwen_tokenizer.convert_ids_to_tokens(list(range(len(mask))))
    allowed = [t for t, m in zip(vocab, mask) if m]
    assert len(allowed) > 50_000
    assert not any(set(t) & set("<>[]") for t in allowed)
    assert not mask[qwen_tokenizer.eos_token_id]
    for word in ("apple", "Ġthe", "Ġfridge"):
        assert mask[qwen_tokenizer.convert_tokens_to_ids(word)]


def test_admissible_subgoals_replace_free_text(tiny_tokenizer):
    grammar, table = make_grammar(tiny_tokenizer)
    subgoals = ["find and take the apple", "heat the apple with the microwave"]
    first = AgentView(task="t", step=0, observation="o", admissible_actions=ALFWORLD_ACTIONS[:3],
                      admissible_subgoals=subgoals)
    later = AgentView(task="t", step=2, observation="o", admissible_actions=ALFWORLD_ACTIONS[:3],
                      admissible_subgoals=subgoals, subgoal=subgoals[0])
    tables = grammar.tables([first, later], 64)
    assert not (tables.alternatives == WILD).any()
    texts = [{table.decode([t for t in a if t >= 0 and t != tiny_tokenizer.eos_token_id]) for a in row if a[0] != PAD}
             for row in tables.alternatives]
    assert len(texts[0]) == 2 * 2 * 3  # KEEP or SWITCH (no subgoal yet) x subgoals x actions
    assert len(texts[1]) == (1 + 2) * 3  # KEEP copies the one in force, or SWITCH to either
    assert "<switch>SWITCH</switch><subgoal>heat the apple with the microwave</subgoal><action>look</action>" in texts[1] or \
        "<switch>SWITCH</switch><subgoal>heat the apple with the microwave</subgoal><action>go to fridge 1</action>" in texts[1]
    for v, switch, subgoal in ((first, True, subgoals[0]), (later, True, subgoals[1]), (later, False, subgoals[0])):
        ids = grammar.response_ids(v, switch, subgoal, "go to fridge 1")
        assert accepted(grammar, v, ids)
        parsed = parse_response(table.decode(ids))
        assert parsed.subgoal == subgoal and parsed.action == "go to fridge 1"
    assert not accepted(grammar, later, grammar.response_ids(later, True, "cool the apple", "go to fridge 1"))


def test_forced_tokens_are_the_single_member_sets():
    from hiper_jax.agent.grammar import forced_tokens

    mode = np.array([SET, SET, TEXT, ALL, SET], np.int8)
    ids = np.array([[4, -1], [4, 5], [7, -1], [-1, -1], [-1, -1]], np.int32)
    assert forced_tokens(mode, ids).tolist() == [True, False, False, False, False]

"""The library comparison of ``benchmarks/bench_constraint.py`` gives every library the language
our grammar admits: its regexes, token-level factoring and bitmask decoding checked here."""

import importlib.util
import os

import numpy as np
import pytest
import regex

from hiper_jax.agent.grammar import PAD, WILD, ResponseGrammar
from hiper_jax.agent.prompts import AgentView
from hiper_jax.agent.spans import TokenBytes

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_constraint.py")
_SPEC = importlib.util.spec_from_file_location("bench_constraint", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(3)
    out = bench.alfworld_views(rng, 4, 10, 40, subgoal_rate=0.0)
    out.append(AgentView(task="t", step=1, observation="o", subgoal="heat the mug (twice)",
                         admissible_actions=["go to desk 1", "take mug 1 from desk 1", "look"]))
    return out


def test_alfworld_views_have_10_to_40_distinct_actions(views):
    for view in views[:4]:
        assert 10 <= len(view.admissible_actions) <= 40
        assert len(set(view.admissible_actions)) == len(view.admissible_actions)


@pytest.mark.parametrize("style", ["flat", "plan_execute"])
def test_the_regex_accepts_exactly_the_grammar_responses(tiny_tokenizer, views, style):
    table = TokenBytes(tiny_tokenizer)
    grammar = ResponseGrammar(tiny_tokenizer, table, style, tiny_tokenizer.eos_token_id)
    for view in views:
        pattern = regex.compile(bench.response_regex(view, style, max_text_chars=96))
        for action in view.admissible_actions:
            for switch in (False, True):
                ids = grammar.response_ids(view, switch=switch, subgoal="find the apple 2", action=action)
                assert pattern.fullmatch(table.decode(ids[:-1])), table.decode(ids[:-1])
        bad = grammar.response_ids(view, switch=True, subgoal="s", action="go to nowhere 9")
        assert not pattern.fullmatch(table.decode(bad[:-1]))
        if style == "plan_execute":
            assert not pattern.fullmatch("<switch>KEEP</switch><subgoal>a [b]</subgoal><action>look</action>")
            assert not pattern.fullmatch(f"<switch>SWITCH</switch><subgoal>{'a' * 97}</subgoal><action>look</action>")


@pytest.mark.parametrize("style", ["flat", "plan_execute"])
def test_token_pieces_factor_the_tables(tiny_tokenizer, views, style):
    """heads x tails (free text as one WILD entry) are exactly the rows' alternatives."""
    grammar = ResponseGrammar(tiny_tokenizer, TokenBytes(tiny_tokenizer), style, tiny_tokenizer.eos_token_id)
    tables = grammar.tables(views, max_new_tokens=128)
    for row, view in enumerate(views):
        heads, tails = bench.token_pieces(grammar, view)
        products = {tuple(h + ([WILD] if free else []) + t) for h, free in heads for t in tails}
        alternatives = {tuple(int(x) for x in alt if x != PAD) for alt in tables.alternatives[row]}
        alternatives.discard(())
        assert products == alternatives


def test_bitmask_and_ranges_round_trip():
    rng = np.random.default_rng(0)
    vocab = 1000
    allowed = rng.random((3, vocab)) < 0.3
    words = np.zeros((3, (vocab + 31) // 32), np.uint32)
    for b, t in zip(*np.nonzero(allowed)):
        words[b, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    np.testing.assert_array_equal(bench.unpack_bitmask(words.view(np.int32), vocab), allowed)
    ids = np.flatnonzero(allowed[0])
    spans = bench.id_ranges(ids)
    np.testing.assert_array_equal(np.concatenate([np.arange(a, b + 1) for a, b in spans]), ids)
    assert all(b2 > b1 + 1 for (_, b1), (b2, _) in zip(spans, spans[1:]))

"""Response parsing: exact on well-formed text, tolerant and never raising on anything else."""

import string

import pytest

from hypothesis import given, settings, strategies as st

from hiper_jax.agent.parsing import decide_turn, format_response, parse_response


def test_well_formed_responses_parse_exactly():
    parsed = parse_response(format_response(True, "find and take the apple", "go to countertop 1"))
    assert parsed.valid and parsed.is_switch and parsed.switch_word == "SWITCH"
    assert parsed.subgoal == "find and take the apple"
    assert parsed.action == "go to countertop 1"
    assert parsed.errors == ()
    keep = parse_response("<switch>KEEP</switch><subgoal>x</subgoal><action>look</action>")
    assert keep.valid and not keep.is_switch


def test_case_whitespace_and_surrounding_text():
    text = "Thinking...\n< Switch >  keep \n</SWITCH>\n<subgoal>  heat   the apple\n</subgoal> <ACTION> open fridge 1 </action> done"
    parsed = parse_response(text)
    assert parsed.valid and parsed.switch_word == "KEEP" and not parsed.is_switch
    assert parsed.subgoal == "heat the apple" and parsed.action == "open fridge 1"


def test_missing_and_unknown_blocks_are_invalid():
    no_switch = parse_response("<subgoal>a</subgoal><action>look</action>")
    assert not no_switch.valid and not no_switch.is_switch and no_switch.action == "look"
    assert "missing <switch> block" in no_switch.errors
    maybe = parse_response("<switch>MAYBE</switch><subgoal>a</subgoal><action>look</action>")
    assert not maybe.valid and not maybe.is_switch and any("MAYBE" in e for e in maybe.errors)
    no_action = parse_response("<switch>SWITCH</switch><subgoal>a</subgoal>")
    assert not no_action.valid and no_action.is_switch and no_action.action is None
    unclosed = parse_response("<switch>SWITCH</switch><subgoal>a</subgoal><action>look")
    assert not unclosed.valid and unclosed.action is None
    empty = parse_response("")
    assert not empty.valid and empty.subgoal is None


def test_repeated_tags_take_the_first_complete_block():
    parsed = parse_response(
        "<action>first</action><switch>SWITCH</switch><switch>KEEP</switch>"
        "<subgoal>one</subgoal><subgoal>two</subgoal><action>second</action>"
    )
    assert parsed.valid and parsed.is_switch and parsed.subgoal == "one" and parsed.action == "first"


def test_non_string_input():
    assert not parse_response(None).valid
    assert not parse_response(12345).valid
    assert not parse_response(b"<switch>KEEP</switch>").valid


def test_decide_turn():
    switch = parse_response(format_response(True, "heat the apple", "go to microwave 1"))
    keep_same = parse_response(format_response(False, "find the apple", "look"))
    keep_changed = parse_response(format_response(False, "something else", "look"))
    garbage = parse_response("I will go to the fridge")

    first = decide_turn(keep_same, None, first_turn=True)
    assert first.subgoal == "find the apple" and not first.switch and not first.keep_changed
    d = decide_turn(switch, "find the apple", first_turn=False)
    assert d.switch and d.subgoal == "heat the apple" and d.action == "go to microwave 1" and d.valid
    d = decide_turn(keep_same, "find the apple", first_turn=False)
    assert not d.switch and d.subgoal == "find the apple" and not d.keep_changed
    d = decide_turn(keep_changed, "find the apple", first_turn=False)
    assert not d.switch and d.subgoal == "find the apple" and d.keep_changed
    d = decide_turn(garbage, "find the apple", first_turn=False)
    assert not d.valid and not d.switch and d.action == "" and d.subgoal == "find the apple"
    assert not d.keep_changed  # no subgoal written


TAG_SOUP = st.lists(
    st.one_of(
        st.sampled_from(["<switch>", "</switch>", "<subgoal>", "</subgoal>", "<action>",
                         "</action>", "<", ">", "</", "KEEP", "SWITCH", "keep", " ", "\n",
                         "<Switch >", "</ action>", "\x00", "🍎", "\\", "(.*)", "[", "$"]),
        st.text(max_size=12),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.text(), TAG_SOUP, st.binary().map(lambda b: b.decode("latin-1"))))
def test_parser_never_raises(text):
    parsed = parse_response(text)
    assert parsed.valid == (parsed.errors == ())
    if parsed.is_switch:
        assert parsed.switch_word == "SWITCH"
    for value in (parsed.subgoal, parsed.action):
        assert value is None or value == value.strip()
    decide_turn(parsed, "current", first_turn=False)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.text(alphabet=string.ascii_letters + " 0123456789", max_size=40),
       st.text(alphabet=string.ascii_letters + " 0123456789", max_size=40))
def test_format_then_parse_round_trips(switch, subgoal, action):
    parsed = parse_response(format_response(switch, subgoal, action))
    assert parsed.valid and parsed.is_switch == switch
    assert parsed.subgoal == " ".join(subgoal.split()) and parsed.action == " ".join(action.split())


def _reference_blocks(text):
    """The blocks as one ``<tag>(.*?)</tag>`` regex finds them (quadratic on unclosed tags)."""
    import re

    flags = re.IGNORECASE | re.DOTALL | re.ASCII
    found = {}
    for name in ("switch", "subgoal", "action"):
        pattern = rf"<\s*{name}\s*>(.*?)<\s*/\s*{name}\s*>"
        match = re.search(pattern.encode() if isinstance(text, bytes) else pattern, text, flags)
        if match is not None:
            found[name] = (match.start(), match.end())
    return found


@settings(max_examples=300, deadline=None)
@given(TAG_SOUP)
def test_blocks_are_the_leftmost_matches_of_the_single_regex(text):
    from hiper_jax.agent.parsing import find_blocks

    for value in (text, text.encode("utf-8")):
        got = {name: (block.start, block.end) for name, block in find_blocks(value).items()}
        assert got == _reference_blocks(value)


@pytest.mark.parametrize("text", [
    "<action>" * 16000,                                   # 128 KB of unclosed tags
    "<switch>KEEP</switch><subgoal>" + "<subgoal>" * 14000 + "x",
    "< action" + " " * 128_000,                           # an opening tag that never closes
    "</action>" * 14000 + "<action>",
])
def test_parsing_is_linear_on_unclosed_tags(text):
    import time

    start = time.perf_counter()
    parsed = parse_response(text)
    elapsed = time.perf_counter() - start
    assert not parsed.valid
    assert elapsed < 0.1, f"{len(text)} characters took {elapsed:.2f} s"

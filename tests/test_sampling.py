"""The jitted KV-cache generator against transformers' generate and against its own definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_qwen2 import make_hf_model, save_hf_model
from hiper_jax.models import qwen2
from hiper_jax.sampling import SamplingConfig, generate, pad_prompts, sample_token, sampling_logits

PAD = 0
PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [40, 2 + 1], [11, 60, 61, 62, 63]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = make_hf_model("gqa2-untied-theta1e6", seed=3)
    config, params = qwen2.load_hf_checkpoint(save_hf_model(hf, tmp_path_factory.mktemp("m")),
                                              progress=False)
    return hf, config, params


@pytest.fixture(scope="module")
def greedy(model):
    """Greedy continuations of PROMPTS (12 tokens, no stop ids) and the padded prompts."""
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    out = generate(params, config, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=12, greedy=True, pad_token_id=PAD))
    return tokens, mask, out


def _hf_greedy(hf, tokens, mask, max_new_tokens, stop_ids):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=list(stop_ids) or None, pad_token_id=PAD)
    return out[:, tokens.shape[1]:].numpy()


def test_greedy_equals_transformers_generate(model, greedy):
    hf, config, params = model
    tokens, mask, free = greedy
    np.testing.assert_array_equal(np.asarray(free.tokens),
                                  _hf_greedy(hf, tokens, mask, 12, ()))
    np.testing.assert_array_equal(np.asarray(free.lengths), [12, 12, 12])
    unstacked = generate(qwen2.unstack_layers(params), config, tokens, mask, jax.random.key(0),
                         SamplingConfig(max_new_tokens=12, greedy=True, pad_token_id=PAD))
    np.testing.assert_array_equal(unstacked.tokens, free.tokens)

    # Stop on a token that row 0 emits at step 4 (and maybe other rows elsewhere).
    stop = int(free.tokens[0, 4])
    out = generate(params, config, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=(stop, 999),
                                  pad_token_id=PAD))
    reference = _hf_greedy(hf, tokens, mask, 12, (stop,))
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, :reference.shape[1]], reference)
    assert np.all(ours[:, reference.shape[1]:] == PAD)
    lengths = np.asarray(out.lengths)
    assert lengths[0] <= 5 and ours[0, lengths[0] - 1] == stop
    for row, length in enumerate(lengths):
        assert np.all(ours[row, length:] == PAD)
        assert np.all(np.asarray(out.logprobs)[row, length:] == 0)
        assert stop not in ours[row, :length - 1]


def test_sampled_logprobs_equal_trainer_logprobs(model):
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    temperature = 0.8
    out = generate(params, config, tokens, mask, jax.random.key(1),
                   SamplingConfig(max_new_tokens=6, temperature=temperature))
    sequence = jnp.concatenate([tokens, out.tokens], axis=1)
    generated = (jnp.arange(6)[None] < out.lengths[:, None]).astype(jnp.int32)
    segments = jnp.concatenate([mask, generated], axis=1)
    hidden, _ = qwen2.forward(params, config, sequence, segment_ids=segments)
    stats = qwen2.token_logprobs(params, config, hidden[:, :-1], sequence[:, 1:],
                                 temperature=temperature)
    recomputed = stats.logprobs[:, tokens.shape[1] - 1:]
    valid = np.asarray(generated).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(recomputed)[valid],
                               atol=1e-4)


def test_generation_is_deterministic_given_a_key(model):
    _, config, params = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_multiple=8)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.95)
    first = generate(params, config, tokens, mask, jax.random.key(7), sampling)
    again = generate(params, config, tokens, mask, jax.random.key(7), sampling)
    other = generate(params, config, tokens, mask, jax.random.key(8), sampling)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first.tokens, other.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(model, greedy):
    _, config, params = model
    tokens, mask, expected = greedy
    for sampling in (SamplingConfig(max_new_tokens=12, top_k=1),
                     SamplingConfig(max_new_tokens=12, top_p=1e-6, temperature=2.0)):
        out = generate(params, config, tokens, mask, jax.random.key(3), sampling)
        np.testing.assert_array_equal(out.tokens, expected.tokens)
        np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)


def test_sample_token_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(0), 20000)
    cases = {
        SamplingConfig(max_new_tokens=1): probs,
        SamplingConfig(max_new_tokens=1, temperature=2.0): probs ** 0.5 / np.sum(probs ** 0.5),
        SamplingConfig(max_new_tokens=1, top_k=3): np.r_[probs[:3], [0] * 3] / probs[:3].sum(),
        SamplingConfig(max_new_tokens=1, top_p=0.75): np.r_[probs[:3], [0] * 3] / probs[:3].sum(),
        SamplingConfig(max_new_tokens=1, top_k=4, top_p=0.6):
            np.r_[probs[:2], [0] * 4] / probs[:2].sum(),
    }
    for sampling, expected in cases.items():
        draw = jax.vmap(lambda k: sample_token(logits, k, sampling))
        tokens, logprobs = draw(keys)
        freq = np.bincount(np.asarray(tokens)[:, 0], minlength=6) / len(keys)
        np.testing.assert_allclose(freq, expected, atol=0.015, err_msg=str(sampling))
        chosen = np.asarray(tokens)[:, 0]
        np.testing.assert_allclose(np.asarray(logprobs)[:, 0], np.log(expected[chosen]), atol=1e-5)
        kept = np.isfinite(np.asarray(sampling_logits(logits, sampling))[0])
        np.testing.assert_array_equal(kept, expected > 0)


def test_pad_prompts_left_pads_to_a_bucket():
    tokens, mask = pad_prompts([[1, 2, 3], [4]], pad_token_id=9, length_multiple=4)
    np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert pad_prompts([[1] * 5], 0, length_multiple=4)[0].shape == (1, 8)


def test_bad_sampling_settings_are_rejected():
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=1, temperature=0.0),
                dict(max_new_tokens=1, top_p=0.0), dict(max_new_tokens=1, top_k=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# --- grammar-constrained decoding --------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hiper_jax.agent.grammar import ResponseGrammar  # noqa: E402
from hiper_jax.agent.parsing import decide_turn, parse_response  # noqa: E402
from hiper_jax.agent.prompts import AgentView  # noqa: E402
from hiper_jax.agent.spans import TokenBytes, response_spans  # noqa: E402
from hiper_jax.sampling import DecodeConstraint  # noqa: E402

RESPONSES = [
    "<switch>SWITCH</switch><subgoal>find and take the apple</subgoal><action>go to fridge 1</action>",
    "<switch>KEEP</switch><subgoal>find and take the apple</subgoal><action>take apple 1 from desk 2</action>",
    "<switch>SWITCH</switch><subgoal>heat the apple</subgoal><action>open microwave 1</action>",
]
OBJECTS = ["apple", "fridge", "desk", "cabinet", "countertop", "mug", "sidetable", "drawer"]
ALFWORLD_ACTION = st.one_of(
    st.builds(lambda o, n: f"go to {o} {n}", st.sampled_from(OBJECTS), st.integers(1, 12)),
    st.builds(lambda a, n, b, m: f"take {a} {n} from {b} {m}", st.sampled_from(OBJECTS),
              st.integers(1, 3), st.sampled_from(OBJECTS), st.integers(1, 3)),
    st.sampled_from(["look", "inventory", "open fridge 1", "use desklamp 1"]))
WEBSHOP_ACTION = st.one_of(
    st.just("search[<your query>]"),
    st.builds(lambda w: f"click[{w}]", st.sampled_from(
        ["back to search", "next >", "< prev", "b0a1c2", "buy now", "size: 8", "blue (large)"])))
SUBGOAL = st.sampled_from([None, "find and take the apple", "heat the apple", "buy the shoes."])


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A byte-level BPE trained on Plan-Execute responses, so that tokens straddle the block
    boundaries (">go", ">KEEP", ">find": the tag's '>' glued to the next word)."""
    from hiper_jax.tokenization import train_byte_level_bpe

    return train_byte_level_bpe(RESPONSES * 50, vocab_size=400)


@pytest.fixture(scope="module")
def random_models(merging_tokenizer, qwen_tokenizer):
    """Random small models over the merging tokenizer's and Qwen's 151k vocabulary."""
    out = {}
    for name, tokenizer in (("merging", merging_tokenizer), ("qwen", qwen_tokenizer)):
        config = qwen2.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True)
        params = qwen2.init_params(jax.random.key(len(name)), config)
        table = TokenBytes(tokenizer, vocab_size=config.vocab_size)
        out[name] = (tokenizer, table, config, params)
    return out


def test_the_merging_tokenizer_straddles_block_boundaries(merging_tokenizer):
    tokens = merging_tokenizer.convert_ids_to_tokens(
        merging_tokenizer.encode(RESPONSES[0], add_special_tokens=False))
    assert ">go" in tokens and any(t.startswith(">") and len(t) > 1 for t in tokens)


def _constrained(entry, style, views, key, temperature=1.0, max_new_tokens=64):
    tokenizer, table, config, params = entry
    grammar = ResponseGrammar(tokenizer, table, style, tokenizer.eos_token_id, max_text_tokens=10)
    tables = grammar.tables(views, max_new_tokens)
    constraint = DecodeConstraint(jnp.asarray(tables.alternatives), jnp.asarray(tables.text_budget),
                                  jnp.asarray(grammar.text_mask))
    prompts = np.tile(np.arange(3, 11, dtype=np.int32), (len(views), 1))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=0)
    out = generate(params, config, prompts, None, key, sampling, constraint)
    return grammar, prompts, out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), model_name=st.sampled_from(["merging", "qwen"]), style=st.sampled_from(["plan_execute", "flat"]),
       env=st.sampled_from(["alfworld", "webshop"]), seed=st.integers(0, 2**16))
def test_every_constrained_response_parses_and_names_an_admissible_action(
        random_models, data, model_name, style, env, seed):
    actions = st.lists(ALFWORLD_ACTION if env == "alfworld" else WEBSHOP_ACTION, min_size=1, max_size=10,
                       unique=True)
    views = [AgentView(task="t", step=1, observation="o", admissible_actions=data.draw(actions),
                       subgoal=data.draw(SUBGOAL)) for _ in range(3)]
    _, table, _, _ = random_models[model_name]
    _, _, out = _constrained(random_models[model_name], style, views, jax.random.key(seed))
    for row, v in enumerate(views):
        ids = np.asarray(out.tokens[row, : out.lengths[row]])
        assert ids[-1] == random_models[model_name][0].eos_token_id
        text = table.decode(ids[:-1])
        if style == "flat":
            assert text.startswith("<action>") and text.endswith("</action>"), text
            action = text[len("<action>"): -len("</action>")]
        else:
            parsed = parse_response(text)
            assert parsed.valid and parsed.switch_word in ("KEEP", "SWITCH"), text
            assert parsed.subgoal, text
            if parsed.switch_word == "KEEP" and v.subgoal:
                assert parsed.subgoal == v.subgoal, text
            action = decide_turn(parsed, v.subgoal, first_turn=False).action
            spans = response_spans(ids, table)
            assert table.decode(ids[spans.action]).endswith(f"{action}</action>")
        templates = [a for a in v.admissible_actions if "<your query>" in a]
        assert action in v.admissible_actions or (
            templates and action.startswith("search[") and action.endswith("]") and len(action) > 8), text


@pytest.mark.parametrize("model_name,style,temperature", [
    ("merging", "plan_execute", 1.0), ("merging", "flat", 0.7), ("qwen", "plan_execute", 0.7)])
def test_constrained_logprobs_equal_the_learners(random_models, model_name, style, temperature):
    """The update's log-probs of freshly sampled constrained turns (packed with their allowed
    sets) equal the sampler's, so PPO's first-epoch ratio is 1; without the allowed sets they
    would not."""
    from hiper_jax.agent.grammar import allowed_sets
    from hiper_jax.rollout.packing import pack_tokens
    from hiper_jax.rollout.types import Trajectory, TurnRecord
    from hiper_jax.train.ppo import logprob_pass

    tokenizer, table, config, params = random_models[model_name]
    views = [AgentView(task="t", step=1, observation="o", subgoal=subgoal,
                       admissible_actions=["go to fridge 1", "go to desk 2", "look", "take mug 1 from desk 2"])
             for subgoal in (None, "heat the apple", None, "find the mug")]
    grammar, prompts, out = _constrained(random_models[model_name], style, views, jax.random.key(5), temperature)
    turns = []
    for row in range(len(views)):
        length = int(out.lengths[row])
        mode, ids = allowed_sets(np.asarray(out.allowed[row, :length]), np.asarray(out.text_on[row, :length]),
                                 grammar.text_mask)
        response = np.asarray(out.tokens[row, :length])
        turns.append(TurnRecord(prompt_ids=prompts[row], response_ids=response,
                                response_logp=np.asarray(out.logprobs[row, :length]),
                                spans=response_spans(response, table), switch=False, keep_changed=False,
                                subgoal="", action="", reward=0.0, done=True, truncated=False, invalid=False,
                                format_valid=True, allowed_mode=mode, allowed_ids=ids))
    packed = pack_tokens([Trajectory(turns=turns)], pad_id=0, length_multiple=32)
    allowed = qwen2.AllowedTokens(packed.allowed_mode, packed.allowed_ids, grammar.text_mask)
    constrained = np.asarray(logprob_pass(params, config, packed.tokens, packed.valid, temperature, allowed))
    free = np.asarray(logprob_pass(params, config, packed.tokens, packed.valid, temperature))
    mask = packed.response_mask
    np.testing.assert_allclose(constrained[mask], packed.old_logp[mask], atol=2e-5)
    assert np.max(np.abs(free[mask] - packed.old_logp[mask])) > 0.1
    # Forced tokens (one allowed) have log-prob exactly 0; chosen ones are below 0.
    forced = mask & (packed.allowed_mode == 1) & (packed.allowed_ids[..., 1] < 0)
    assert forced.sum() > 10 and np.all(constrained[forced] == 0.0)


def test_sampler_inputs_are_checked_naming_the_argument():
    from hiper_jax.sampling import DecodeConstraint, check_prompts
    config = qwen2.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                               tie_word_embeddings=True)
    tokens, mask = pad_prompts([[3, 4, 5], [6]], PAD, length_multiple=4)
    sampling = SamplingConfig(max_new_tokens=2)
    key = jax.random.key(1)
    constraint = DecodeConstraint(jnp.full((2, 1, 3), -1, jnp.int32), jnp.ones((2,), jnp.int32),
                                  jnp.ones((32,), bool))
    bad = {
        "prompt_tokens must have shape": (tokens[0], mask, key, None),
        "prompt_tokens must have an int dtype": (tokens.astype(np.float32), mask, key, None),
        r"prompt_mask has shape \(2, 3\), but prompt_tokens": (tokens, mask[:, 1:], key, None),
        "key must have shape": (tokens, mask, jax.random.split(key, 2), None),
        r"constraint.text_budget must have shape \[B\]": (
            tokens, mask, key, constraint._replace(text_budget=jnp.ones((3,), jnp.int32))),
        r"constraint.text_mask must have shape \[V\] = \(32,\)": (
            tokens, mask, key, constraint._replace(text_mask=jnp.ones((31,), bool))),
        "constraint.alternatives must have an int dtype": (
            tokens, mask, key, constraint._replace(alternatives=jnp.zeros((2, 1, 3)))),
    }
    for message, (t, m, k, c) in bad.items():
        with pytest.raises(ValueError, match=message):  # at trace time, before params are read
            generate({}, config, t, m, k, sampling, c)
    check_prompts(tokens, mask, key)
    check_prompts(tokens, None, jax.random.key_data(key))  # a raw uint32 [2] key
    with pytest.raises(ValueError, match="key must have an int dtype"):
        check_prompts(tokens, None, jnp.zeros((2,), jnp.float32))

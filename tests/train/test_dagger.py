"""DAgger collection: a constrained random model plays ALFWorld, the expert labels every state
it reaches, and the labels become supervised examples in the grammar's tokens."""

import jax
import numpy as np
import pytest

from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.parsing import parse_response
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.models import qwen2
from hiper_jax.rollout.collector import EnvSpec
from hiper_jax.sampling import SamplingConfig
from hiper_jax.train.dagger import EXPERT_KEYS, agreement, expert_turns, play
from hiper_jax.train.sft import make_examples


@pytest.fixture(scope="module")
def visited(games_root, qwen_tokenizer):
    config = qwen2.Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=4096, tie_word_embeddings=True)
    params = qwen2.init_params(jax.random.key(0), config)
    table = TokenBytes(qwen_tokenizer, vocab_size=config.vocab_size)
    grammar = ResponseGrammar(qwen_tokenizer, table, "plan_execute", qwen_tokenizer.eos_token_id)
    prompt_cfg = PromptConfig(env="alfworld", max_steps=6, max_prompt_tokens=4096)
    spec = EnvSpec("hiper_envs:hiper/ALFWorld-v0",
                   {"games": str(games_root / "eval"), "expert": True, "subgoals": True}, "game")
    sampling = SamplingConfig(max_new_tokens=64, stop_token_ids=(qwen_tokenizer.eos_token_id,),
                              pad_token_id=qwen_tokenizer.pad_token_id)
    trajectories = play(params, config, qwen_tokenizer, table, spec, [0, 1, 2, 3], prompt_cfg, sampling,
                        jax.random.key(1), grammar=grammar, num_envs=4, max_turns=6, info_keys=EXPERT_KEYS,
                        length_multiple=1024)
    return trajectories, grammar, prompt_cfg, table


def test_every_visited_state_keeps_its_view_and_the_experts_label(visited):
    trajectories, _, _, _ = visited
    assert len(trajectories) == 4 and all(t.num_turns == 6 or t.won for t in trajectories)
    for trajectory in trajectories:
        for step, turn in enumerate(trajectory.turns):
            view = turn.view
            assert view.step == step and len(view.history) == step
            assert turn.action in view.admissible_actions and not turn.invalid  # constrained
            parsed = parse_response(turn.response_text)
            assert parsed.subgoal in view.admissible_subgoals
            label = turn.env_info["expert_action"]
            assert set(turn.env_info) == set(EXPERT_KEYS)
            assert label is None or label in view.admissible_actions
            assert turn.env_info["expert_subgoal"] in view.admissible_subgoals
    assert 0 <= agreement(trajectories) <= 1


def test_expert_labels_become_grammar_examples(visited, qwen_tokenizer):
    trajectories, grammar, prompt_cfg, table = visited
    turns = list(expert_turns(trajectories))
    labelled = sum(1 for t in trajectories for turn in t.turns if turn.env_info["expert_action"])
    assert len(turns) == labelled > 0
    for demo in turns:
        v = demo.view
        assert demo.action in v.admissible_actions and demo.subgoal in v.admissible_subgoals
        assert demo.switch == (v.step == 0 or v.subgoal != demo.subgoal)
    examples = make_examples(turns, qwen_tokenizer, prompt_cfg, grammar)
    for demo, example in zip(turns, examples):
        parsed = parse_response(table.decode(example.response_ids))
        assert parsed.valid and parsed.action == demo.action and parsed.subgoal == demo.subgoal
        assert parsed.is_switch == demo.switch or (not demo.switch and demo.view.subgoal is None)
        assert example.response_ids[-1] == qwen_tokenizer.eos_token_id
        assert "Subgoals: " in table.decode(example.prompt_ids)
    assert np.mean([d.switch for d in turns]) > 0

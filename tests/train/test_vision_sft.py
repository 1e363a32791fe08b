"""The vision-language warm start: MedVista oracle demonstrations re-rendered into prompts with
their images (the env's own pixels), and SFT that fits them with the vision tower frozen."""

import jax
import numpy as np
import pytest

from hiper_jax.agent.demos import read_demos
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.rollout.images import ImagePrompter
from hiper_jax.train.sft import SFTConfig
from hiper_jax.train.vision_sft import (make_vision_examples, train_vision_sft, turn_images,
                                        vision_batches, vision_sft_loss)
from tests.rollout import vl_fixtures


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from hiper_envs.medvista import synth
    from hiper_envs.medvista.env import MedVistaEnv
    from hiper_envs.medvista.oracle import write_demos

    root = tmp_path_factory.mktemp("medvista_sft")
    synth.generate(str(root / "data"), synth.SynthConfig(num_images=8, seed=6), progress=False)
    env = MedVistaEnv(str(root / "data"), image_size=vl_fixtures.IMAGE_SIZE, info_images="all")
    write_demos(env, str(root / "demos.jsonl"), episodes=8, progress=False)
    return env, read_demos(str(root / "demos.jsonl"))


def test_demo_views_are_the_envs_images(demos):
    env, episodes = demos
    assert any(len(e["turns"]) > 1 for e in episodes)
    for index, episode in enumerate(episodes):
        _, info = env.reset(options={"index": index})
        for turn in episode["turns"]:
            views = turn_images(episode, turn, env.image_size)
            assert len(views) == len(info["images"])
            for view, shown in zip(views, info["images"]):
                np.testing.assert_array_equal(view, shown)
            _, _, terminated, truncated, info = env.step(turn["action"])
    with pytest.raises(ValueError, match="image_boxes"):
        turn_images({"env": "alfworld", "turns": []}, {}, 16)


def test_vision_sft_fits_the_demos_and_leaves_the_tower(demos):
    env, episodes = demos
    tok = vl_fixtures.tokenizer()
    config, params = vl_fixtures.model(tok)
    _, prompt_cfg = vl_fixtures.medvista(env.data_dir, info_images="all", max_turns=env.max_turns)
    grammar = ResponseGrammar(tok, TokenBytes(tok), "plan_execute", tok.eos_token_id, max_text_tokens=16)
    examples = make_vision_examples(episodes, tok, prompt_cfg, ImagePrompter(config, tok),
                                    env.image_size, grammar=grammar)
    won = [e for e in episodes if e["won"]]
    assert len(examples) == sum(len(e["turns"]) for e in won)
    for example in examples:
        assert np.sum(example.prompt_ids == config.image_token_id) == 16 * len(example.images)
    sft = SFTConfig(epochs=12, lr=1e-2, warmup_steps=4, batch_rows=8, length_multiple=64)

    def nll(p):
        batches = vision_batches(p, config, examples, sft.batch_rows, sft.length_multiple, patch_multiple=64)
        return float(np.mean([float(vision_sft_loss(p, config, b)[0]) for b in batches]))

    before = nll(params)
    trained, history = train_vision_sft(params, config, examples, sft, progress=False, patch_multiple=64)
    after = nll(trained)
    assert len(history) == sft.epochs * -(-len(examples) // sft.batch_rows)
    assert after < 0.5 * before, (before, after)
    jax.tree.map(np.testing.assert_array_equal, params["visual"], trained["visual"])
    assert not np.allclose(params["language_model"]["embed_tokens"]["embedding"],
                           trained["language_model"]["embed_tokens"]["embedding"])

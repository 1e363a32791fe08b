"""Prompts with images (placeholder runs in the user message) and the collector's image plumbing:
MedVista's images reach every turn's prompt and record; text envs are unaffected."""

import jax
import numpy as np
import pytest

from hiper_jax.agent.parsing import format_response
from hiper_jax.agent.prompts import AgentView, PromptConfig, render_prompt
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.models.qwen2_5_vl import processing
from hiper_jax.rollout.collector import Collector, EnvSpec
from hiper_jax.rollout.images import ImagePrompter, find_last, insert_images, turn_sequence
from hiper_jax.rollout.policies import ScriptedPolicy
from tests.rollout import vl_fixtures


@pytest.fixture(scope="module")
def vl():
    tok = vl_fixtures.tokenizer()
    return tok, vl_fixtures.config(tok)


@pytest.fixture(scope="module")
def medvista_dir(tmp_path_factory):
    from hiper_envs.medvista import synth

    root = tmp_path_factory.mktemp("medvista_vl") / "data"
    synth.generate(str(root), synth.SynthConfig(num_images=6, seed=1), progress=False)
    return str(root)


def _view():
    return AgentView(task="Is there a lesion?", step=0, observation="Image 1 is the full image.",
                     admissible_actions=["answer[yes]", "answer[no]"])


def test_image_blocks_open_the_user_message(vl):
    tok, config = vl
    cfg = PromptConfig(env="medvista", intro="Read the image.", max_steps=3)
    text = render_prompt(_view(), cfg, tok)
    images = [np.zeros((16, 16, 3), np.uint8), np.ones((8, 12, 3), np.uint8)]
    prompt = ImagePrompter(config, tok)(text, images)
    assert prompt.grid.tolist() == [[1, 8, 8], [1, 4, 6]] and prompt.images[1] is images[1]
    decoded = tok.decode(prompt.token_ids)
    assert decoded.count("<|image_pad|>") == 16 + 6
    assert "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|><|vision_start|>" in decoded
    assert decoded.split("<|vision_end|>")[-1].startswith("Task: Is there a lesion?")
    # Removing the vision tokens gives the text prompt back.
    vision_ids = [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id]
    assert [t for t in prompt.token_ids if t not in vision_ids] == text
    # No images: the text prompt unchanged.
    assert ImagePrompter(config, tok)(text, []).token_ids == text


def test_insert_and_find_are_exact_and_refuse_bad_input(vl):
    tok, config = vl
    assert find_last([1, 2, 3, 1, 2], [1, 2]) == 3 and find_last([1, 2], [3]) == -1
    assert find_last([1], [1, 2]) == -1
    ids = insert_images([5, 6, 7], 1, np.array([[1, 2, 4]]), config)
    assert ids == [5, config.vision_start_token_id] + [config.image_token_id] * 2 + [
        config.vision_end_token_id, 6, 7]
    with pytest.raises(ValueError, match="outside the prompt"):
        insert_images([5], 3, np.array([[1, 2, 2]]), config)
    prompter = ImagePrompter(config, tok)
    with pytest.raises(ValueError, match="no user message header"):
        prompter(tok.encode("no chat here"), [])
    with pytest.raises(ValueError, match="already holds vision tokens"):
        prompter(ids, [])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        prompter(render_prompt(_view(), PromptConfig(env="medvista", intro="x"), tok),
                 [np.zeros((10, 16, 3), np.uint8)])


@pytest.mark.parametrize("info_images", ["new", "all"])
def test_medvista_images_reach_every_turn(vl, medvista_dir, info_images):
    """A scripted agent zooms twice, then answers: turn t's prompt holds t + 1 image blocks,
    its record the episode's images (the full image, then each zoom) and their grid, and the
    re-made scoring sequence holds the same patches the images give."""
    tok, config = vl
    spec, prompt_cfg = vl_fixtures.medvista(medvista_dir, info_images=info_images, max_turns=3)
    actions = ["zoom[0, 0, 500, 500]", "zoom[500, 500, 1000, 1000]", "answer[yes]"]
    policy = ScriptedPolicy(lambda v: format_response(v.step == 0, "look", actions[v.step]), tok)
    with Collector(spec, 2, prompt_cfg, tok, TokenBytes(tok), max_turns=3, groups=1,
                   envs_per_worker=2, prompter=ImagePrompter(config, tok)) as collector:
        trajectories, _ = collector.run(policy, [0, 1], jax.random.key(0))
    for traj in trajectories:
        assert traj.num_turns == 3 and traj.turns[-1].done
        for t, turn in enumerate(traj.turns):
            assert not turn.invalid
            assert len(turn.images) == t + 1 and turn.image_grid.tolist() == [[1, 8, 8]] * (t + 1)
            assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image in turn.images)
            assert np.sum(turn.prompt_ids == config.image_token_id) == 16 * (t + 1)
            assert np.sum(turn.prompt_ids == config.vision_start_token_id) == t + 1
            sequence = turn_sequence(turn, config.vision)
            np.testing.assert_array_equal(sequence.pixel_values,
                                          processing.image_patches(turn.images, config.vision)[0])
            assert len(sequence.tokens) == len(turn.prompt_ids) + len(turn.response_ids)
        # The full image stays first; each zoom adds a different view.
        assert all(np.array_equal(turn.images[0], traj.turns[0].images[0]) for turn in traj.turns)
        assert not np.array_equal(traj.turns[2].images[1], traj.turns[2].images[2])


def test_text_envs_record_no_images(tiny_tokenizer):
    spec = EnvSpec("hiper_envs:hiper/ChooseWord-v0", {"num_tasks": 4}, "task")
    prompt_cfg = PromptConfig(env="choose_word", max_steps=2, max_prompt_tokens=1024)
    policy = ScriptedPolicy(lambda v: format_response(True, "open the door", "say alpha"), tiny_tokenizer)
    with Collector(spec, 2, prompt_cfg, tiny_tokenizer, TokenBytes(tiny_tokenizer), max_turns=2,
                   groups=1, envs_per_worker=2) as collector:
        trajectories, _ = collector.run(policy, [0, 1], jax.random.key(0))
    turns = [turn for t in trajectories for turn in t.turns]
    assert turns and all(turn.images == () and turn.image_grid is None for turn in turns)
    assert all(turn_sequence(turn, None).pixel_values is None for turn in turns)

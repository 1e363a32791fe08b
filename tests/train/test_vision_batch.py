"""PPO on a Qwen2.5-VL policy's MedVista trajectories: the batch (positions, frozen-tower
features, log-probs equal to the sampler's), an update that trains the language model and the
value heads and leaves the vision tower as it was, and clear errors for what is not supported."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.hae import HAEConfig
from hiper_jax.models.value_heads import CriticConfig, init_critic
from hiper_jax.rollout.collector import Collector
from hiper_jax.rollout.images import ImagePrompter
from hiper_jax.rollout.vlm_policy import VLMPolicy
from hiper_jax.sampling import SamplingConfig
from hiper_jax.train import ppo
from hiper_jax.train.batch import BatchSettings
from hiper_jax.train.vision_batch import build_vision_ppo_batch, vision_pass
from tests.rollout import vl_fixtures


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    """(tok, config, params, grammar, trajectories): 4 constrained MedVista episodes (the
    module takes ~25 s on a 2-core CPU, most of it compiling)."""
    from hiper_envs.medvista import synth

    root = tmp_path_factory.mktemp("medvista_ppo") / "data"
    synth.generate(str(root), synth.SynthConfig(num_images=6, seed=4), progress=False)
    tok = vl_fixtures.tokenizer()
    config, params = vl_fixtures.model(tok)
    spec, prompt_cfg = vl_fixtures.medvista(str(root), info_images="all", max_turns=3)
    token_bytes = TokenBytes(tok)
    grammar = ResponseGrammar(tok, token_bytes, "plan_execute", tok.eos_token_id, max_text_tokens=4)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, stop_token_ids=(tok.eos_token_id,),
                              pad_token_id=tok.pad_token_id)
    policy = VLMPolicy(params, config, sampling, tok.pad_token_id, length_multiple=32, grammar=grammar,
                       patch_multiple=64)
    with Collector(spec, 4, prompt_cfg, tok, token_bytes, max_turns=3, groups=1, envs_per_worker=4,
                   prompter=ImagePrompter(config, tok)) as collector:
        trajectories, _ = collector.run(policy, [0, 1, 2, 3], jax.random.key(5))
    return tok, config, params, grammar, trajectories


def _state(config, params, lr=3e-3):
    critic = init_critic(jax.random.key(1), config.text, params, CriticConfig(shared_backbone=True))
    actor_tx = ppo.freeze_vision(ppo.make_optimizer(lr, 0.01, 1.0))
    critic_tx = ppo.make_optimizer(lr, 0.0, 1.0)
    return ppo.init_train_state(params, critic, actor_tx, critic_tx), actor_tx, critic_tx


SETTINGS = BatchSettings(estimator="hae", max_turns=3, rows=4, length_multiple=32)


def test_ppo_on_vision_rollouts_trains_the_language_model_only(rollouts):
    tok, config, params, grammar, trajectories = rollouts
    state, actor_tx, critic_tx = _state(config, params)
    built = build_vision_ppo_batch(trajectories, state, ppo.reference_params(params, jnp.float32), config,
                                   SETTINGS, HAEConfig(), tok.pad_token_id, text_mask=grammar.text_mask,
                                   patch_multiple=64)
    batch, stats = built.batch, built.stats
    turns = sum(len(t.turns) for t in trajectories)
    assert stats["batch_rows"] == turns and stats["batch_images"] >= turns
    # The recomputed log-probs are the sampler's: the batch trains the policy that sampled it.
    assert stats["logp_mismatch_max"] < 2e-4
    assert batch.positions.shape == batch.tokens.shape + (3,)
    real = np.asarray(built.batch.valid).any(1)
    assert np.all(np.abs(batch.features[real]).sum(axis=(1, 2)) > 0)
    # Positions are M-RoPE's: image tokens share a temporal index, text positions are not arange.
    assert not np.array_equal(batch.positions[0, :, 1], np.arange(batch.positions.shape[1]))
    assert np.asarray(batch.loss_mask).sum() > 0 and np.abs(batch.advantages[batch.loss_mask]).sum() > 0

    surrogate = lambda actor: float(np.sum(np.where(
        batch.loss_mask, batch.advantages, 0.0) * np.asarray(vision_pass(
            actor, state.critic, config, batch.tokens, batch.valid, batch.positions, batch.features,
            batch.value_read, 1.0, ppo.batch_allowed(batch, grammar.text_mask), with_values=False)[0])))
    before = surrogate(params)
    visual = jax.tree.map(np.asarray, params["visual"])
    language = jax.tree.map(np.asarray, params["language_model"])
    heads = jax.tree.map(np.asarray, state.critic)
    cfg = ppo.PPOConfig(mini_batch_rows=4, micro_batch_rows=2, epochs=2, kl_coef=0.01)
    new_state, metrics = ppo.ppo_update(state, batch, np.random.default_rng(0), config=config, ppo=cfg,
                                        actor_tx=actor_tx, critic_tx=critic_tx, text_mask=grammar.text_mask)
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    # The first step runs at the sampling parameters: old and new log-probs agree.
    assert metrics["first_step_abs_log_ratio"] < 1e-5
    jax.tree.map(np.testing.assert_array_equal, visual, jax.tree.map(np.asarray, new_state.actor["visual"]))
    changed = lambda old, new: max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), old, new)))
    assert changed(language, new_state.actor["language_model"]) > 1e-4
    assert changed(heads, new_state.critic) > 1e-4
    # The update follows the advantages.
    assert surrogate(new_state.actor) > before


def test_vision_batches_refuse_what_is_not_supported(rollouts):
    tok, config, params, grammar, trajectories = rollouts
    state, actor_tx, critic_tx = _state(config, params)
    with pytest.raises(ValueError, match="pack_rows"):
        build_vision_ppo_batch(trajectories, state, None, config, dataclasses.replace(SETTINGS, pack_rows=True),
                               HAEConfig(), tok.pad_token_id, text_mask=grammar.text_mask)
    separate = state._replace(critic=init_critic(jax.random.key(1), config.text, params["language_model"]))
    with pytest.raises(ValueError, match="shared_backbone=True"):
        build_vision_ppo_batch(trajectories, separate, None, config, SETTINGS, HAEConfig(),
                               tok.pad_token_id, text_mask=grammar.text_mask)
    with pytest.raises(ValueError, match="Qwen2_5_VLConfig"):
        build_vision_ppo_batch(trajectories, state, None, config.text, SETTINGS, HAEConfig(),
                               tok.pad_token_id)
    built = build_vision_ppo_batch(trajectories, state, None, config,
                                   dataclasses.replace(SETTINGS, reference_pass=False), HAEConfig(),
                                   tok.pad_token_id, text_mask=grammar.text_mask, patch_multiple=64)
    text_batch = built.batch._replace(positions=None, features=None)
    with pytest.raises(ValueError, match="positions and features"):
        ppo.ppo_update(state, text_batch, np.random.default_rng(0), config=config, ppo=ppo.PPOConfig(),
                       actor_tx=actor_tx, critic_tx=critic_tx, text_mask=grammar.text_mask)
    with pytest.raises(ValueError, match="text model"):
        ppo.check_batch_matches(built.batch, config.text)
    with pytest.raises(ValueError, match="pack_rows"):
        ppo.ppo_update(state, built.batch, np.random.default_rng(0), config=config,
                       ppo=ppo.PPOConfig(pack_rows=True), actor_tx=actor_tx, critic_tx=critic_tx,
                       text_mask=grammar.text_mask)


def test_freeze_vision_zeroes_the_tower_and_keeps_no_state_for_it():
    params = {"visual": {"w": jnp.ones((3,))}, "language_model": {"w": jnp.ones((2,))}}
    tx = ppo.freeze_vision(ppo.make_optimizer(0.1, 0.1, 1.0))
    assert tx is ppo.freeze_vision(ppo.make_optimizer(0.1, 0.1, 1.0))
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt, params)
    np.testing.assert_array_equal(updates["visual"]["w"], 0.0)
    assert np.all(np.asarray(updates["language_model"]["w"]) < 0)
    sizes = sum(x.size for x in jax.tree.leaves(opt) if hasattr(x, "size") and x.ndim > 0)
    assert sizes == 2 * 2  # Adam's two moments of the language model's 2 weights only

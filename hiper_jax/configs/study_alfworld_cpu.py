"""The estimator study sized for a 2-core CPU (about 2 hours): the embedded tiny warm start,
small generated ALFWorld games, hae vs turn_gae vs grpo, 3 seeds, 2400 training env turns each.

    python benchmarks/compare_estimators.py --config configs/study_alfworld_cpu.py

Interrupt it at any time; the same command continues where it stopped.
"""

import ml_collections

from hiper_jax.study import base_study
from hiper_jax.assets import TINY_ALFWORLD
from hiper_jax.train.config import base_config


def get_config():
    run = base_config()
    run.env.name = "alfworld"
    run.env.num_envs = 16
    run.env.max_turns = 30
    run.env.num_train_games = 120
    run.env.num_eval_games = 48
    run.env.envs_per_worker = 4
    # The task types and scene size the shipped warm start was trained on (hiper_jax.tiny).
    run.env.task_types = ("pick_and_place_simple", "look_at_obj_in_light")
    run.env.max_receptacles = 4
    run.env.max_distractors = 1
    run.model.checkpoint = TINY_ALFWORLD
    run.prompt.history_turns = 2
    run.prompt.max_prompt_tokens = 512
    run.sampling.max_new_tokens = 48
    run.sampling.prompt_length_multiple = 128
    run.advantage.gamma = 0.95
    run.advantage.lam_turn = 0.95
    run.advantage.lam_seg = 0.95
    run.advantage.keep_penalty = -0.3
    run.advantage.keep_penalty_mode = "normalized"
    run.advantage.keep_consistency_penalty = -0.3
    run.advantage.invalid_action_penalty = 1.0
    run.advantage.bootstrap_truncated = True
    # 4 tasks x 4 rollouts per iteration for every estimator (grpo needs the groups; the others
    # see exactly the same tasks).
    run.advantage.rollouts_per_task = 4
    run.ppo.actor_lr = 1e-4
    run.ppo.critic_lr = 1e-3
    run.ppo.mini_batch_rows = 64
    run.ppo.micro_batch_rows = 16
    run.ppo.length_multiple = 128
    run.ppo.epochs = 1
    run.train.iterations = 40           # an upper bound; the env-turn budget ends each run
    run.train.max_env_turns = 2400
    run.train.eval_every = 3
    run.train.checkpoint_every = 2
    run.train.tensorboard = False

    study = base_study()
    study.estimators = ("hae", "turn_gae", "grpo")
    study.seeds = (0, 1, 2)
    study.out_dir = "runs/study_alfworld_cpu"
    study.variance_episodes = 64
    study.variance_minibatches = 32
    return ml_collections.ConfigDict({"run": run, "study": study})

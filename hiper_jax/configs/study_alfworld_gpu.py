"""The estimator study sized for one GPU or TPU host: Qwen2.5-1.5B-Instruct (the size of the
published comparison), all six generated ALFWorld task types, the same seven arms as
``study_alfworld_cpu`` (hae, turn_gae, grpo, gigpo and the three HAE ablations), 5 seeds, the
same 100k training env turns each (about 60 iterations of 64 episodes), 120 held-out episodes
per evaluation.

    python benchmarks/compare_estimators.py --config configs/study_alfworld_gpu.py \
        --config.run.model.checkpoint=/path/to/Qwen2.5-1.5B-Instruct

Point ``run.env.games_dir`` at the official ALFWorld data (``train/`` and ``eval/`` folders)
to use it instead of generated games.
"""

import ml_collections

from hiper_jax.experiments.study_config import base_study
from hiper_jax.train.config import published_hiper_config


def get_config():
    run = published_hiper_config("alfworld", checkpoint="checkpoints/Qwen2.5-1.5B-Instruct")
    run.env.num_envs = 64
    run.env.num_train_games = 1200
    run.env.num_eval_games = 120
    run.advantage.rollouts_per_task = 8   # 8 tasks x 8 rollouts per iteration, for every estimator
    run.train.eval_episodes = 0           # every one of the 120 eval games once
    run.ppo.mini_batch_rows = 128
    run.train.iterations = 200            # an upper bound; the env-turn budget ends each run
    run.train.max_env_turns = 100_000
    run.train.eval_every = 10
    run.train.checkpoint_every = 5

    study = base_study()
    study.estimators = ("hae", "turn_gae", "grpo", "gigpo", "hae_no_term", "hae_no_keep_penalty",
                        "hae_flat_subgoal")
    study.seeds = (0, 1, 2, 3, 4)
    study.reference = "hae"
    study.out_dir = "runs/study_alfworld_gpu"
    study.variance_episodes = 256
    study.variance_minibatches = 64
    return ml_collections.ConfigDict({"run": run, "study": study})

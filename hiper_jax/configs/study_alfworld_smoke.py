"""The CPU estimator study (``study_alfworld_cpu``) on a toy budget, to check that it runs end
to end: all seven arms, 2 seeds, 4 episodes (2 tasks x 2 rollouts) of at most 4 turns per
iteration, one iteration per run, 6 held-out episodes, a 4-episode gradient-variance check.

    python benchmarks/compare_estimators.py --config configs/study_alfworld_smoke.py

The numbers it prints mean nothing; ``tests/test_study.py`` runs it.
"""

from hiper_jax.configs.study_alfworld_cpu import get_config as cpu_study_config


def get_config():
    config = cpu_study_config()
    run = config.run
    run.env.num_envs = 4
    run.env.envs_per_worker = 4
    run.env.max_turns = 4
    run.env.num_train_games = 6
    run.env.num_eval_games = 6
    run.advantage.rollouts_per_task = 2
    run.ppo.mini_batch_rows = 16
    run.ppo.micro_batch_rows = 16
    run.train.iterations = 2
    run.train.max_env_turns = 1          # the first iteration spends it
    run.train.eval_every = 2
    config.study.seeds = (0, 1)
    config.study.out_dir = "runs/study_alfworld_smoke"
    config.study.variance_estimators = ("hae", "gigpo")
    config.study.variance_episodes = 4
    config.study.variance_minibatches = 2
    return config

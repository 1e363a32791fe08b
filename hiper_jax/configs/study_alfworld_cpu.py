"""The estimator study on a 2-core CPU: the main job's setting (``alfworld_tiny``: the shipped
warm start, all six generated ALFWorld task types, its scene sizes, the Plan-Execute grammar
constraint with the task's subgoals, its PPO and HAE settings), seven arms (hae, turn_gae,
grpo, gigpo and HAE without its termination advantage, without its keep penalties, with flat
subgoal credit), 5 seeds, the same 1,200 training env turns per run, 96 held-out episodes per
evaluation.

    python benchmarks/compare_estimators.py --config configs/study_alfworld_cpu.py

Interrupt it at any time; the same command continues where it stopped. Measured on a quiet
2-core VM (benchmarks/RESULTS.md): each run evaluates the warm start and its final policy on 96
episodes and trains 4 iterations of 16 episodes (about 1,480 turns); 35 runs took 71 min (about
2 min each) and the gradient variance under 4 policies about 25 min more. At this budget no arm
learned; ``--config.run.train.max_env_turns=3600`` triples the steps and still fits about 3 hours.
Cut ``study.seeds`` or ``study.estimators`` from the command line for a first look.
"""

import ml_collections

from hiper_jax.configs.alfworld_tiny import get_config as main_job_config
from hiper_jax.experiments.study_config import base_study


def get_config():
    run = main_job_config()
    run.env.num_eval_games = 96          # every eval game once per evaluation: 96 episodes
    run.env.num_envs = 16                # 4 tasks x 4 rollouts per iteration (below)
    run.ppo.mini_batch_rows = 64
    # 4 tasks x 4 rollouts per iteration for every arm (grpo and gigpo need the groups; the
    # others see exactly the same tasks).
    run.advantage.rollouts_per_task = 4
    run.train.iterations = 40            # an upper bound; the env-turn budget ends each run
    run.train.max_env_turns = 1200
    run.train.eval_every = 40            # evaluations: the warm start and the final policy
    run.train.checkpoint_every = 1
    run.train.tensorboard = False

    study = base_study()
    study.estimators = ("hae", "turn_gae", "grpo", "gigpo", "hae_no_term", "hae_no_keep_penalty",
                        "hae_flat_subgoal")
    study.seeds = (0, 1, 2, 3, 4)
    study.reference = "hae"
    study.out_dir = "runs/study_alfworld_cpu"
    study.variance_estimators = ("hae", "turn_gae", "grpo", "gigpo")
    study.variance_episodes = 64
    study.variance_minibatches = 32
    return ml_collections.ConfigDict({"run": run, "study": study})

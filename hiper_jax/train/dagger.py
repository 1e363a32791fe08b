"""DAgger for warm starts: play the model, have the env's expert label the states it reaches.

Supervised fine-tuning on expert demonstrations only shows the model states the expert visits;
once the model makes a mistake it is in a state it never saw. A DAgger round (Ross et al.,
2011) plays the current model, asks the expert what it would do in every state the model
reached (an env built with ``expert=True`` reports ``expert_action`` and ``expert_subgoal`` in
``info``), adds those labelled states to the training set and trains again.

The label of a visited state: the expert's action, its subgoal for that state, and SWITCH
when that subgoal differs from the subgoal in force in the model's episode (KEEP otherwise),
so the model also learns to correct a subgoal it got wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Optional

import jax
import numpy as np

from hiper_jax.agent.demos import DemoTurn, response_text
from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import PromptConfig
from hiper_jax.agent.spans import TokenBytes
from hiper_jax.models import qwen2
from hiper_jax.rollout.collector import Collector, EnvSpec
from hiper_jax.rollout.policies import LLMPolicy
from hiper_jax.rollout.types import Trajectory
from hiper_jax.sampling import SamplingConfig

EXPERT_KEYS = ("expert_action", "expert_subgoal")


def play(params, model_config: qwen2.Qwen2Config, tokenizer, token_bytes: TokenBytes, spec: EnvSpec,
         tasks: Sequence[int], prompt_cfg: PromptConfig, sampling: SamplingConfig, key: jax.Array,
         grammar: Optional[ResponseGrammar] = None, num_envs: int = 16, max_turns: int = 30,
         info_keys: Sequence[str] = (), length_multiple: int = 128) -> list[Trajectory]:
    """One episode of the model per task (in batches of ``num_envs`` envs), in task order.

    Args:
      params, model_config: the policy.
      spec: the environment; ``tasks``: task indices (its reset option).
      sampling: decoding settings; ``grammar``: constrained decoding when given.
      info_keys: env ``info`` entries to keep per turn (``TurnRecord.env_info``).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    policy = LLMPolicy(qwen2.unstack_layers(params), model_config, sampling, pad_id,
                       length_multiple=length_multiple, rows=math.ceil(num_envs / 2), grammar=grammar)
    out: list[Trajectory] = []
    with Collector(spec, num_envs, prompt_cfg, tokenizer, token_bytes, max_turns,
                   groups=2 if num_envs >= 2 else 1, info_keys=info_keys) as collector:
        for start in range(0, len(tasks), num_envs):
            chunk = list(tasks[start: start + num_envs])
            padded = chunk + [chunk[0]] * (num_envs - len(chunk))
            trajectories, _ = collector.run(policy, padded, jax.random.fold_in(key, start))
            out.extend(trajectories[: len(chunk)])
    return out


def expert_turns(trajectories: Sequence[Trajectory], style: str = "plan_execute") -> Iterator[DemoTurn]:
    """Every turn of ``trajectories`` the expert labelled (``TurnRecord.env_info`` holds
    :data:`EXPERT_KEYS`), as supervised examples of what the expert would have done there."""
    for index, trajectory in enumerate(trajectories):
        for turn in trajectory.turns:
            action = turn.env_info.get("expert_action")
            subgoal = turn.env_info.get("expert_subgoal") or ""
            if not action or turn.view is None:
                continue
            switch = turn.view.step == 0 or turn.view.subgoal != subgoal
            yield DemoTurn(view=turn.view, response=response_text(switch, subgoal, action, style),
                           episode=index, task_type=trajectory.task_type, switch=switch,
                           subgoal=subgoal, action=action)


def agreement(trajectories: Sequence[Trajectory]) -> float:
    """Fraction of expert-labelled turns where the model's action was the expert's."""
    labelled = [(turn.action, turn.env_info.get("expert_action")) for t in trajectories for turn in t.turns
                if turn.env_info.get("expert_action")]
    return float(np.mean([a == b for a, b in labelled])) if labelled else 0.0

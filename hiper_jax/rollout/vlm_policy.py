"""A vision-language policy: the jitted Qwen2.5-VL sampler behind the collector's policy contract.

    prompter = ImagePrompter(config, tokenizer)
    policy = VLMPolicy(params, config, sampling, pad_id, grammar=grammar)
    with Collector(spec, n, prompt_cfg, tokenizer, token_bytes, max_turns,
                   prompter=prompter) as collector:
        trajectories, stats = collector.run(policy, tasks, key)

``dispatch(prompts, views, key)`` takes :class:`~hiper_jax.rollout.images.ImagePrompt` s (token
ids with one placeholder run per image, the uint8 images, their grid), turns the images into
patches (:func:`~hiper_jax.models.qwen2_5_vl.processing.image_patches`) and dispatches
:func:`~hiper_jax.models.qwen2_5_vl.sampling.generate_from_prompt` asynchronously, like
:class:`~hiper_jax.rollout.policies.LLMPolicy`.

Static shapes: rows (``rows`` or a bucket of the prompt count), prompt length (a multiple of
``length_multiple``) and patch count (a bucket of ``patch_multiple``) only grow over a policy's
life, so a rollout compiles the sampler a few times at its start and then reuses it. Padding rows
are one token long and hold no image.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from hiper_jax.agent.grammar import ResponseGrammar
from hiper_jax.agent.prompts import AgentView
from hiper_jax.models.qwen2_5_vl import vision
from hiper_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from hiper_jax.models.qwen2_5_vl.processing import image_patches
from hiper_jax.rollout.images import ImagePrompt
from hiper_jax.rollout.packing import bucket_size
from hiper_jax.rollout.policies import Pending, grammar_constraint, host_responses


def pad_patches(prompt, config: Qwen2_5_VLConfig, grid: np.ndarray, num_patches: int):
    """``prompt`` (a :class:`~hiper_jax.models.qwen2_5_vl.sampling.VisionPrompt` with images)
    with its patches zero-padded to ``num_patches`` (at least its count) and the layout to
    match."""
    count = prompt.pixel_values.shape[0]
    if num_patches == count:
        return prompt
    pixels = np.concatenate([prompt.pixel_values,
                             np.zeros((num_patches - count, config.vision.patch_dim), np.float32)])
    layout = vision.patch_layout(vision.as_grid(grid), config.vision, num_patches=num_patches)
    return prompt._replace(pixel_values=pixels, layout=layout)


class VLMPolicy:
    """Samples responses to prompts with images with the Qwen2.5-VL sampler.

    Args:
      params, config: the policy model (:class:`~hiper_jax.models.qwen2_5_vl.Qwen2_5_VLConfig`).
      sampling: a :class:`hiper_jax.sampling.SamplingConfig`.
      pad_id: padding token id (not an image token).
      length_multiple: prompt length bucket.
      rows: fixed batch rows (at least the largest prompt batch), or None (bucketed).
      grammar: a :class:`~hiper_jax.agent.grammar.ResponseGrammar` for constrained decoding.
      patch_multiple: the patch-count bucket unit (a multiple of the tower's ``merge_unit``).
    """

    def __init__(self, params, config: Qwen2_5_VLConfig, sampling, pad_id: int,
                 length_multiple: int = 64, rows: Optional[int] = None,
                 grammar: Optional[ResponseGrammar] = None, patch_multiple: int = 256):
        if pad_id in (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id):
            raise ValueError(f"pad_id={pad_id} is a vision token id of the config")
        if patch_multiple < 1 or patch_multiple % config.vision.merge_unit:
            raise ValueError(f"patch_multiple={patch_multiple} must be a positive multiple of "
                             f"merge_unit={config.vision.merge_unit}")
        self.params = params
        self.config = config
        self.sampling = sampling
        self.pad_id = pad_id
        self.length_multiple = length_multiple
        self.rows = rows
        self.grammar = grammar
        self.patch_multiple = patch_multiple
        self._text_mask = None if grammar is None else jax.device_put(grammar.text_mask)
        self._prompt_length = 0
        self._num_patches = 0
        self._table_shape = (1, 1)  # alternatives, depth

    def dispatch(self, prompts: Sequence[ImagePrompt], views: Sequence[AgentView],
                 key: jax.Array) -> Pending:
        """Dispatches one batch; ``prompts[i]`` and ``views[i]`` are the same turn's.

        Raises:
            ValueError: no prompts, more prompts than ``rows``, a prompt that is not an
                :class:`ImagePrompt`, or images/placeholders that do not match (the sampler's
                checks).
        """
        from hiper_jax.models.qwen2_5_vl import sampling as vl_sampling
        from hiper_jax.sampling import pad_prompts

        num_prompts = len(prompts)
        if not num_prompts:
            raise ValueError("dispatch needs at least one prompt")
        if not all(isinstance(p, ImagePrompt) for p in prompts):
            raise ValueError("VLMPolicy takes ImagePrompt prompts (the collector makes them when "
                             "it is given a prompter)")
        if self.rows is not None and num_prompts > self.rows:
            raise ValueError(f"{num_prompts} prompts do not fit rows={self.rows}")
        rows = max(self.rows or 0, bucket_size(num_prompts))
        padded = [p.token_ids for p in prompts] + [[self.pad_id]] * (rows - num_prompts)
        tokens, mask = pad_prompts(padded, self.pad_id, length_multiple=self.length_multiple,
                                   min_length=self._prompt_length)
        self._prompt_length = tokens.shape[1]
        images = [image for p in prompts for image in p.images]
        pixels, grid = image_patches(images, self.config.vision)
        prompt = vl_sampling.prepare_prompt(self.config, tokens, mask,
                                            pixels if len(grid) else None,
                                            grid if len(grid) else None, self.patch_multiple)
        if prompt.pixel_values is not None:
            self._num_patches = max(self._num_patches, prompt.pixel_values.shape[0])
            prompt = pad_patches(prompt, self.config, grid, self._num_patches)
        constraint = None
        if self.grammar is not None:
            constraint, self._table_shape = grammar_constraint(
                self.grammar, views, rows, self.sampling.max_new_tokens, self._table_shape,
                self._text_mask)
        out = vl_sampling.generate_from_prompt(self.params, self.config, prompt, key,
                                               self.sampling, constraint)
        return Pending(lambda: host_responses(out, num_prompts, self.grammar if constraint is not None
                                              else None), device_output=out)

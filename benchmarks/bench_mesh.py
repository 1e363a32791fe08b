"""Per-device memory and update throughput of the PPO step on each mesh shape.

Usage: python benchmarks/bench_mesh.py [--models tiny,0.5b] [--rows 16] [--length 256]

Runs on 8 simulated CPU devices (set here before JAX starts). For every mesh (data, fsdp,
tensor) in (1,1,1) (one device), (8,1,1), (2,4,1), (1,8,1), (2,2,2):

* state MiB/device: the train state (fp32 policy, separate critic backbone, AdamW moments) one
  device holds, from the shardings (the largest device);
* compiled MiB/device: XLA's memory analysis of the compiled PPO step (arguments + outputs +
  temporaries - aliased donations), per device;
* step s and tokens/s: the jitted step on ``rows x length`` random tokens, median of 3 after a
  warm-up (the tiny model only: a 0.5B step takes minutes on 2 CPU cores, so its row shows
  compiled memory alone, from abstract arrays, nothing allocated).

Simulated devices share the host's cores, so throughput here compares meshes' overheads on one
CPU, not accelerator speed; the (1,1,1) row is the baseline of the same run.

``--sampling``: the sampler instead (``hiper_jax.sampling.generate`` on a per-host sampling
mesh, weights from ``sampling_copy``'s layout, prompt rows over data x fsdp), compiled from
abstract arrays on each host mesh, XLA's per-device memory analysis beside
``memory_plan.sampling_terms``: arguments (the weights and prompts) against the plan's sampling
weights, temporaries against its KV cache + prefill + logits + gathered weights.
``--sampling-rows``, ``--prompt`` and ``--new-tokens`` set the call's shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2))
MIB = 2.0 ** 20


def model_config(name: str):
    from hiper_jax.models import qwen2

    if name == "tiny":
        from hiper_jax.assets import TINY_ALFWORLD

        return qwen2.Qwen2Config.from_hf_config(TINY_ALFWORLD)
    if name == "0.5b":  # Qwen2.5-0.5B's architecture
        return qwen2.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                 tie_word_embeddings=True)
    raise ValueError(f"unknown model {name!r} (tiny, 0.5b)")


def abstract_state(config, mesh, ppo_setup):
    """The train state as sharded ShapeDtypeStructs (nothing allocated)."""
    from hiper_jax.models import qwen2
    from hiper_jax.models.value_heads import CriticConfig, critic_param_shardings, init_critic
    from hiper_jax.train.ppo import TrainState

    actor_tx, critic_tx = ppo_setup["actor_tx"], ppo_setup["critic_tx"]
    dtype = jnp.dtype(config.param_dtype)
    actor = jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),
                         qwen2.param_shapes(config), qwen2.param_shardings(config, mesh),
                         is_leaf=lambda x: isinstance(x, tuple))
    critic_config = CriticConfig(shared_backbone=False)
    critic_shapes = jax.eval_shape(lambda a: init_critic(jax.random.key(0), config, a, critic_config), actor)
    critic = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          critic_shapes, critic_param_shardings(config, critic_config, mesh))

    def like_params(opt_state, params):
        # AdamW's moments take their parameter's layout, as optax's eager init gives them.
        by_shape = {leaf.shape: leaf.sharding for leaf in jax.tree.leaves(params)}
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_shape[x.shape])
                            if x.shape in by_shape else x, opt_state)

    def make(a, c):
        return TrainState(a, c, like_params(actor_tx.init(a), actor), like_params(critic_tx.init(c), critic),
                          jnp.zeros((), jnp.int32))

    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(make)
    shardings = jitted.lower(actor, critic).compile().output_shardings
    shapes = jax.eval_shape(make, actor, critic)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=sharding if sharding.device_set == replicated.device_set else replicated),
        shapes, shardings)


def state_bytes_per_device(state) -> float:
    per_device: dict = {}
    for leaf in jax.tree.leaves(state):
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            size = int(np.prod([len(range(*i.indices(d))) for i, d in zip(index, leaf.shape)]))
            per_device[device] = per_device.get(device, 0) + size * leaf.dtype.itemsize
    return max(per_device.values())


def mini_batch(config, mesh, rows: int, length: int, abstract: bool):
    from hiper_jax import distributed
    from hiper_jax.train.ppo import PPOBatch

    rng = np.random.default_rng(0)
    mask = np.zeros((rows, length), bool)
    mask[:, length // 2:] = True
    arrays = PPOBatch(
        tokens=rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32),
        valid=np.ones((rows, length), bool), loss_mask=mask,
        advantages=rng.normal(size=(rows, length)).astype(np.float32),
        old_logp=np.full((rows, length), -3.0, np.float32), ref_logp=np.full((rows, length), -3.0, np.float32),
        value_read=np.full((rows, 3), length - 1, np.int32),
        value_targets=rng.normal(size=(rows, 3)).astype(np.float32),
        old_values=np.zeros((rows, 3), np.float32), value_mask=np.ones((rows, 3), bool))
    sharding = distributed.batch_sharding(mesh)
    if abstract:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), arrays)
    return jax.device_put(arrays, sharding)


def planned(config, shape, rows: int, length: int, ppo) -> dict:
    """``hiper_jax.memory_plan``'s per-device bytes for this step, from the model's config and a
    run config with the step's settings: ``state`` (policy and critic params and AdamW
    moments, what the step takes as arguments) and ``update`` (gradients, activations, logits,
    gathered weights: the step's temporaries)."""
    from hiper_jax import memory_plan
    from hiper_jax.train.config import base_config

    run = base_config()
    run.env.num_envs = rows
    run.prompt.max_prompt_tokens = length
    run.sampling.max_new_tokens = 0
    run.model.param_dtype = str(jnp.dtype(config.param_dtype))
    run.model.compute_dtype = str(jnp.dtype(config.compute_dtype))
    run.ppo.micro_batch_rows = ppo.micro_batch_rows
    run.ppo.mini_batch_rows = ppo.mini_batch_rows
    run.ppo.remat = "layer" if ppo.remat else "none"
    run.ppo.logits_chunk_tokens = ppo.logits_chunk
    plan = memory_plan.plan_for_run(run, config, shape)
    state = sum(v for k, v in plan.resident.items() if k in ("policy params", "policy AdamW",
                                                             "critic params + AdamW"))
    return {"state": state, "update": sum(plan.update.values()), "terms": plan.update}


def measure(name: str, shape, rows: int, length: int, run: bool) -> dict:
    from hiper_jax import distributed
    from hiper_jax.models import qwen2
    from hiper_jax.models.value_heads import CriticConfig, critic_param_shardings, init_critic
    from hiper_jax.train.ppo import PPOConfig, init_train_state, make_optimizer, ppo_step

    config = model_config(name)
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = distributed.make_mesh(*shape, devices=devices)
    setup = dict(actor_tx=make_optimizer(1e-5, 0.0, 1.0), critic_tx=make_optimizer(1e-4, 0.0, 1.0))
    ppo = PPOConfig(micro_batch_rows=max(rows // 2, 1), mini_batch_rows=rows, remat=True)
    state_abs = abstract_state(config, mesh, setup)
    mini_abs = mini_batch(config, mesh, rows, length, abstract=True)
    start = time.perf_counter()
    compiled = ppo_step.lower(state_abs, mini_abs, config=config, ppo=ppo, **setup).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    compiled_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    plan = planned(config, shape, rows, length, ppo)
    out = {"model": name, "mesh": shape, "state_mib": state_bytes_per_device(state_abs) / MIB,
           "compiled_mib": compiled_bytes / MIB, "temp_mib": analysis.temp_size_in_bytes / MIB,
           "plan_state_mib": plan["state"] / MIB, "plan_update_mib": plan["update"] / MIB,
           "compile_s": compile_s, "step_s": float("nan"), "tokens_per_s": float("nan")}
    if run:
        actor = qwen2.init_params(jax.random.key(0), config, mesh=mesh)
        critic_config = CriticConfig(shared_backbone=False)
        critic = jax.device_put(init_critic(jax.random.key(1), config, actor, critic_config),
                                critic_param_shardings(config, critic_config, mesh))
        state = init_train_state(actor, critic, setup["actor_tx"], setup["critic_tx"])
        mini = mini_batch(config, mesh, rows, length, abstract=False)
        times = []
        for k in range(4):
            start = time.perf_counter()
            state, metrics = ppo_step(state, mini, config=config, ppo=ppo, **setup)
            jax.block_until_ready(metrics["loss"])
            if k:
                times.append(time.perf_counter() - start)
        out["step_s"] = statistics.median(times)
        out["tokens_per_s"] = rows * length / out["step_s"]
    return out


SAMPLING_MESHES = ((1, 1, 1), (1, 1, 8), (1, 8, 1), (8, 1, 1), (2, 1, 4), (2, 2, 2))


def model_shape(config):
    from hiper_jax import memory_plan

    return memory_plan.ModelShape.from_config(config, "model")


def abstract_sampling_call(config, mesh, rows: int, prompt: int):
    """The sampler's arguments as sharded ShapeDtypeStructs: the weights in the layout
    ``sampling_copy`` gives them on ``mesh``, prompts with rows over data x fsdp."""
    from hiper_jax import distributed
    from hiper_jax.models import qwen2

    dtype = jnp.dtype(config.compute_dtype)
    params = jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),
                          qwen2.param_shapes(config, stacked=False),
                          qwen2.param_shardings(config, mesh, stacked=False),
                          is_leaf=lambda x: isinstance(x, tuple))
    shards = distributed.num_batch_shards(mesh)
    sharding = distributed.batch_sharding(mesh) if rows % shards == 0 else NamedSharding(
        mesh, jax.sharding.PartitionSpec())
    prompts = jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=sharding)
    return params, prompts


def measure_sampling(name: str, shape, rows: int, prompt: int, new_tokens: int) -> dict:
    """XLA's per-device memory of one compiled sampler call on the host mesh ``shape``, and the
    plan's terms for it (``memory_plan.sampling_terms``)."""
    from hiper_jax import distributed, memory_plan
    from hiper_jax.sampling import SamplingConfig, generate

    config = model_config(name)
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = distributed.make_mesh(*shape, devices=devices)
    params, prompts = abstract_sampling_call(config, mesh, rows, prompt)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=(0,))
    start = time.perf_counter()
    with distributed.on_mesh(mesh):
        compiled = generate.lower(params, config, prompts, prompts, jax.random.key(0),
                                  sampling).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    shards = distributed.num_batch_shards(mesh)
    rows_per_chip = rows // shards if rows % shards == 0 else rows  # else replicated
    act = jnp.dtype(config.compute_dtype).itemsize
    terms = memory_plan.sampling_terms(model_shape(config), tuple(shape), rows_per_chip, prompt,
                                       new_tokens, act)
    weights = terms.pop("sampling weights")
    return {"model": name, "mesh": tuple(shape), "args_mib": analysis.argument_size_in_bytes / MIB,
            "temp_mib": analysis.temp_size_in_bytes / MIB, "out_mib": analysis.output_size_in_bytes / MIB,
            "plan_weights_mib": weights / MIB, "plan_temp_mib": sum(terms.values()) / MIB,
            "terms_mib": {k: v / MIB for k, v in terms.items()}, "compile_s": compile_s}


def main_sampling(args) -> None:
    meshes = ([tuple(int(x) for x in m.split(",")) for m in args.meshes.split(";")]
              if args.meshes_given else SAMPLING_MESHES)
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; one sampler call: "
          f"{args.sampling_rows} rows x {args.prompt} prompt + {args.new_tokens} new tokens, float32")
    head = (f"{'model':<6} {'mesh (d,f,t)':<13} {'args MiB/dev':>12} {'plan weights':>12} {'ratio':>6} "
            f"{'temp MiB/dev':>12} {'plan temp':>10} {'ratio':>6} {'compile s':>9}  plan temp terms (MiB)")
    print(head + "\n" + "-" * len(head))
    for name in args.models.split(","):
        for shape in meshes:
            r = measure_sampling(name, shape, args.sampling_rows, args.prompt, args.new_tokens)
            terms = ", ".join(f"{k} {v:.1f}" for k, v in r["terms_mib"].items() if v)
            print(f"{name:<6} {str(shape):<13} {r['args_mib']:>12.1f} {r['plan_weights_mib']:>12.1f} "
                  f"{r['plan_weights_mib'] / r['args_mib']:>6.2f} {r['temp_mib']:>12.1f} "
                  f"{r['plan_temp_mib']:>10.1f} {r['plan_temp_mib'] / r['temp_mib']:>6.2f} "
                  f"{r['compile_s']:>9.1f}  {terms}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,0.5b")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--meshes", default=";".join(",".join(map(str, m)) for m in MESHES),
                        help="mesh shapes data,fsdp,tensor separated by ';'")
    parser.add_argument("--no-steps", action="store_true", help="compile only (no timed steps)")
    parser.add_argument("--sampling", action="store_true",
                        help="the sampler's memory on host meshes instead of the PPO step")
    parser.add_argument("--sampling-rows", type=int, default=16, help="--sampling: rows per call")
    parser.add_argument("--prompt", type=int, default=256, help="--sampling: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="--sampling: new tokens")
    args = parser.parse_args(argv)
    args.meshes_given = any(a.startswith("--meshes") for a in (argv if argv is not None else sys.argv[1:]))
    if args.sampling:
        main_sampling(args)
        return
    meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes.split(";")]
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; mini-batch {args.rows} rows x "
          f"{args.length} tokens, micro-batches of {max(args.rows // 2, 1)} rows, remat")
    head = (f"{'model':<6} {'mesh (d,f,t)':<13} {'state MiB/dev':>14} {'compiled MiB/dev':>17} "
            f"{'temp MiB/dev':>13} {'compile s':>10} {'step s':>8} {'tokens/s':>9} {'vs (1,1,1)':>10}"
            f" {'plan state':>10} {'ratio':>6} {'plan update':>11} {'ratio':>6}")
    print(head + "\n" + "-" * len(head))
    for name in args.models.split(","):
        baseline = None
        for shape in meshes:
            r = measure(name, shape, args.rows, args.length, run=name == "tiny" and not args.no_steps)
            baseline = r["tokens_per_s"] if baseline is None else baseline
            ratio = r["tokens_per_s"] / baseline if baseline == baseline else float("nan")
            print(f"{name:<6} {str(shape):<13} {r['state_mib']:>14.1f} {r['compiled_mib']:>17.1f} "
                  f"{r['temp_mib']:>13.1f} {r['compile_s']:>10.1f} {r['step_s']:>8.3f} "
                  f"{r['tokens_per_s']:>9.0f} {ratio:>10.2f} {r['plan_state_mib']:>10.1f} "
                  f"{r['plan_state_mib'] / r['state_mib']:>6.2f} {r['plan_update_mib']:>11.1f} "
                  f"{r['plan_update_mib'] / r['temp_mib']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Plain-Python reference for HAE and the flat estimators, written from the definitions.

Deliberately naive: explicit segment lists, explicit sums and powers, one trajectory at a time.
Used by the tests as an independent check and by benchmarks/bench_hae.py as the loop baseline.
"""

from __future__ import annotations

import math


def shaped_rewards_ref(rewards, switch, mask, cfg, invalid=None, keep_changed=None):
    out = []
    for b in range(len(rewards)):
        n = sum(1 for m in mask[b] if m)
        row = []
        for t in range(n):
            r = float(rewards[b][t])
            keep = not bool(switch[b][t])
            if keep:
                if cfg.keep_penalty_mode == "fixed":
                    r += cfg.keep_penalty
                elif n > 1:
                    r += cfg.keep_penalty / n
            if invalid is not None and invalid[b][t]:
                r -= cfg.invalid_action_penalty
            if keep_changed is not None and keep and t >= 1 and keep_changed[b][t]:
                r += cfg.keep_consistency_penalty
            row.append(r)
        out.append(row)
    return out


def hae_ref(rewards, values_low, values_high, values_term, switch, dones, mask, cfg,
            invalid=None, keep_changed=None):
    """Returns dict of [B][T] lists: adv_low, ret_low, adv_high, ret_high, adv_term, ret_term,
    boundary. ``mask`` rows must be prefixes of real turns."""
    g = cfg.gamma
    shaped = shaped_rewards_ref(rewards, switch, mask, cfg, invalid, keep_changed)
    num_b, num_t = len(rewards), len(rewards[0])
    keys = ("adv_low", "ret_low", "adv_high", "ret_high", "adv_term", "ret_term")
    out = {k: [[0.0] * num_t for _ in range(num_b)] for k in keys}
    out["boundary"] = [[False] * num_t for _ in range(num_b)]
    for b in range(num_b):
        r = shaped[b]
        n = len(r)
        if n == 0:
            continue
        done_last = bool(dones[b][n - 1])
        starts = [t for t in range(n) if t == 0 or switch[b][t]]
        segments = []
        for k, s in enumerate(starts):
            e = starts[k + 1] - 1 if k + 1 < len(starts) else n - 1
            segments.append((s, e))
        vl, vh = values_low[b], values_high[b]

        def bootstrap(k, own_value):
            s, e = segments[k]
            if k + 1 < len(segments):
                return vh[segments[k + 1][0]]
            if done_last:
                return 0.0
            return own_value if cfg.bootstrap_truncated else 0.0

        for k, (s, e) in enumerate(segments):
            out["boundary"][b][s] = True
            boot_high = bootstrap(k, vh[s])
            boot_low = bootstrap(k, vl[e])
            # low level: GAE restricted to the segment
            deltas = {}
            for t in range(s, e + 1):
                nxt = vl[t + 1] if t < e else boot_low
                deltas[t] = r[t] + g * nxt - vl[t]
            for t in range(s, e + 1):
                adv = sum((g * cfg.lam_turn) ** (j - t) * deltas[j] for j in range(t, e + 1))
                out["adv_low"][b][t] = adv
                out["ret_low"][b][t] = adv + vl[t]
            # termination head: return to the segment end plus the discounted bootstrap
            for t in range(s, e + 1):
                ret = sum(g ** (j - t) * r[j] for j in range(t, e + 1)) + g ** (e - t + 1) * boot_high
                out["ret_term"][b][t] = ret
                if values_term is not None:
                    out["adv_term"][b][t] = ret - values_term[b][t]
        # high level: SMDP GAE across segment starts
        seg_deltas = []
        for k, (s, e) in enumerate(segments):
            d = e - s + 1
            ret = sum(g ** j * r[s + j] for j in range(d)) + g ** d * bootstrap(k, vh[s])
            seg_deltas.append(ret - vh[s])
        for k, (s, e) in enumerate(segments):
            adv, factor = 0.0, 1.0
            for m in range(k, len(segments)):
                adv += factor * seg_deltas[m]
                sm, em = segments[m]
                if m + 1 < len(segments):
                    factor *= g ** (em - sm + 1) * cfg.lam_seg
            out["adv_high"][b][s] = adv
            out["ret_high"][b][s] = adv + vh[s]
    if cfg.normalize:
        _normalize_ref(out["adv_low"], mask)
        _normalize_ref(out["adv_high"], out["boundary"])
        _normalize_ref(out["adv_term"], mask)
    return out


def _normalize_ref(x, where):
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if where[b][t]]
    if not vals:
        return
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    for b in range(len(x)):
        for t in range(len(x[b])):
            x[b][t] = (x[b][t] - mean) / (std + 1e-8) if where[b][t] else 0.0


def turn_gae_ref(rewards, values, dones, mask, gamma, lam, bootstrap_truncated):
    """Standard GAE over the real turns of each trajectory: returns (adv, ret) [B][T]."""
    num_b, num_t = len(rewards), len(rewards[0])
    adv = [[0.0] * num_t for _ in range(num_b)]
    ret = [[0.0] * num_t for _ in range(num_b)]
    for b in range(num_b):
        n = sum(1 for m in mask[b] if m)
        if n == 0:
            continue
        done_last = bool(dones[b][n - 1])
        for t in range(n):
            total = 0.0
            for j in range(t, n):
                if j + 1 < n:
                    nxt = values[b][j + 1]
                elif done_last:
                    nxt = 0.0
                else:
                    nxt = values[b][j] if bootstrap_truncated else 0.0
                delta = rewards[b][j] + gamma * nxt - values[b][j]
                total += (gamma * lam) ** (j - t) * delta
            adv[b][t] = total
            ret[b][t] = total + values[b][t]
    return adv, ret


def episode_returns_ref(rewards, mask):
    return [sum(float(rewards[b][t]) for t in range(len(rewards[b])) if mask[b][t])
            for b in range(len(rewards))]


def grpo_ref(returns, group_ids, eps=1e-6):
    """Group-normalised returns: (R - mean_group) / (std_group + eps), unbiased std (0 for n=1)."""
    out = []
    for i, r in enumerate(returns):
        members = [returns[j] for j in range(len(returns)) if group_ids[j] == group_ids[i]]
        mean = sum(members) / len(members)
        if len(members) > 1:
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
        else:
            std = 0.0
        out.append((r - mean) / (std + eps))
    return out


def rloo_ref(returns, group_ids):
    """Leave-one-out baseline: R_i - mean of the other members of the group (0 if alone)."""
    out = []
    for i, r in enumerate(returns):
        others = [returns[j] for j in range(len(returns)) if group_ids[j] == group_ids[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


def _std_unbiased(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gigpo_ref(rewards, mask, group_ids, state_ids, gamma, step_weight=1.0, mode="mean_norm",
              eps=1e-6):
    """GiGPO from its definition, one turn at a time: episode return normalised over the group's
    turns (a group of one turn keeps its return), plus ``step_weight`` times the discounted
    return normalised over the turns of the group with the same state (0 for a lone turn)."""
    num_b, num_t = len(rewards), len(rewards[0])
    lengths = [sum(1 for m in mask[b] if m) for b in range(num_b)]
    episode = [sum(float(rewards[b][t]) for t in range(lengths[b])) for b in range(num_b)]
    step_return = [[0.0] * num_t for _ in range(num_b)]
    for b in range(num_b):
        for t in range(lengths[b]):
            step_return[b][t] = sum(gamma ** (j - t) * float(rewards[b][j]) for j in range(t, lengths[b]))

    def normalise(value, members, lone_mean):
        if len(members) == 1:
            mean, std = lone_mean, 1.0
        else:
            mean, std = sum(members) / len(members), _std_unbiased(members)
        return value - mean if mode == "mean_norm" else (value - mean) / (std + eps)

    out = [[0.0] * num_t for _ in range(num_b)]
    for b in range(num_b):
        group_turns = [(c, u) for c in range(num_b) if group_ids[c] == group_ids[b]
                       for u in range(lengths[c])]
        episode_members = [episode[c] for c, _ in group_turns]
        episode_adv = normalise(episode[b], episode_members, lone_mean=0.0)
        for t in range(lengths[b]):
            anchor = [step_return[c][u] for c, u in group_turns if state_ids[c][u] == state_ids[b][t]]
            step_adv = normalise(step_return[b][t], anchor, lone_mean=step_return[b][t])
            out[b][t] = episode_adv + step_weight * step_adv
    return out

"""Rollouts: host-process env pools, the multi-turn collector, packing turns into arrays."""

"""Metrics logging: a resumed run tells one history, in metrics.jsonl and in TensorBoard."""

from hiper_jax.train.logger import MetricsLogger, read_metrics


def tensorboard_steps(log_dir, tag):
    """The steps TensorBoard itself shows for ``tag`` (its event reader applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_a_resumed_run_purges_the_steps_it_repeats(tmp_path):
    first = MetricsLogger(str(tmp_path), tensorboard=True)
    for iteration in range(4):  # the killed attempt got to iteration 3; its checkpoint is at 2
        first.log({"iteration": iteration, "train/success": 0.1 * iteration})
    first.close()
    resumed = MetricsLogger(str(tmp_path), tensorboard=True, resume_from=2)
    for iteration in range(2, 5):
        resumed.log({"iteration": iteration, "train/success": 0.5 + 0.1 * iteration})
    resumed.close()
    want = [(0, 0.0), (1, 0.1), (2, 0.7), (3, 0.8), (4, 0.9)]
    got = tensorboard_steps(tmp_path / "tensorboard", "train/success")
    assert [step for step, _ in got] == [step for step, _ in want]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got, want))
    assert [(r["iteration"], round(r["train/success"], 6)) for r in read_metrics(tmp_path / "metrics.jsonl")] == want

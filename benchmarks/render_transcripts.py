"""PNG renderings of the explore notebook's views for a run directory.

    python benchmarks/render_transcripts.py --run runs/alfworld_tiny --out benchmarks/results/explore

Evaluates the run's newest checkpoint on ``--episodes`` games of its eval split exactly as
``notebooks/explore_agent.ipynb`` does (:func:`hiper_jax.eval.evaluate_checkpoint` with token
advantages), then writes ``transcript_won.png`` and ``transcript_lost.png`` (the first won and
the first lost episode, token by token, :func:`hiper_jax.plotting.plot_transcript`),
``task_success.png`` and the evaluation's ``table.md`` under ``--out`` (its other files,
``episodes.jsonl`` with the token advantages and ``transcripts.html``, go to ``--eval-out``, by
default a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/alfworld_tiny", help="a run directory of python -m hiper_jax.train")
    parser.add_argument("--out", default="benchmarks/results/explore")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-turns", type=int, default=14, help="turns drawn per transcript")
    parser.add_argument("--eval-out", default="", help="the evaluation's output directory")
    args = parser.parse_args()

    from hiper_jax.eval import evaluate_checkpoint
    from hiper_jax.plotting import plot_task_success, plot_transcript, pyplot

    os.makedirs(args.out, exist_ok=True)
    eval_out = args.eval_out or tempfile.mkdtemp(prefix="render_transcripts_")
    result = evaluate_checkpoint(args.run, split="eval", episodes=args.episodes, seeds=(args.seed,),
                                 tokens=True, out_dir=eval_out)
    print(result.table)
    shutil.copy(os.path.join(eval_out, "table.md"), os.path.join(args.out, "table.md"))
    plt = pyplot()
    written = []
    for outcome in ("won", "lost"):
        record = next((r for r in result.records if r["won"] == (outcome == "won")), None)
        if record is None:
            print(f"no {outcome} episode among the {len(result.records)} played")
            continue
        fig = plot_transcript(record, max_turns=args.max_turns)
        written.append(os.path.join(args.out, f"transcript_{outcome}.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    fig = plot_task_success(result.summary, title=f"{args.run}: held-out success per task type "
                                                  f"({args.episodes} games)")
    written.append(os.path.join(args.out, "task_success.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    print("written:", ", ".join(written), "| evaluation files:", eval_out)


if __name__ == "__main__":
    main()

"""The HAE demo runs, prints its table and writes its plot."""

from hiper_jax import demo


def test_demo_prints_table_and_writes_plot(tmp_path, capsys):
    demo.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "A_high" in printed and printed.count("SWITCH") == 3
    assert (tmp_path / "hae_trajectory.png").stat().st_size > 10_000

"""The step-time benchmark runs end to end and its FLOP count is the documented one."""

import json

from benchmarks.step_time import forward_flops, main, step_flops


def test_flop_count_matches_the_documented_forward_equivalents():
    # Module docstring: forward 7.0176 M MACs per example; plain 2.73 and penalised 4.93 forwards.
    assert forward_flops(1) == 2 * 7_017_600
    assert step_flops(1, penalised=False) == 2 * 19_171_200
    assert step_flops(1, penalised=True) == 2 * 34_579_200
    assert round(step_flops(1, True) / forward_flops(1), 2) == 4.93
    assert step_flops(32, True) == 32 * step_flops(1, True)


def test_benchmark_writes_a_table_row_per_config_and_a_summary(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--batch-sizes", "2", "--repeats", "2", "--warmup", "1", "--min-block-ms", "1",
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {(r["framework"], r["step"]) for r in payload["results"]}
    assert rows == {("jax", "penalised"), ("jax", "plain"), ("torch", "penalised"), ("torch", "plain")}
    assert all(r["median_ms"] > 0 and r["peak_mib"] > 0 for r in payload["results"])
    summary = payload["summary"][0]
    assert {"torch_over_jax_penalised", "jax_penalty_overhead", "torch_penalty_overhead"} <= set(summary)
    assert "| 2 | jax | penalised |" in capsys.readouterr().out

"""benchmarks/plan_vs_measured.py on the committed GPU results: every configuration gets a row with both figures,
the JSON mirrors the table, and the configurations the cost model covers fully (llama-3-8b on the GPU engine) stay
within the 20% goal."""

import json

from benchmarks import plan_vs_measured


def test_table_and_json_cover_every_benchmark(tmp_path, capsys):
    out = tmp_path / "plan_vs_measured.json"
    assert plan_vs_measured.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    groups = {row["group"] for row in rows}
    assert {"prefill, 1 GPU (engine_speed)", "decode step = TPOT, 1 GPU (engine_speed)",
            "prefill, mesh engine (cp_scaling)", "partial prefill, CP2 (cp_scaling)",
            "KV transfer, whole KV (kv_transfer)", "TTFT, 1 GPU prefill (kv_transfer)"} <= groups
    assert all(row["measured_ms"] > 0 and row["predicted_ms"] > 0 for row in rows)
    for row in rows:
        assert abs(row["error"] - (row["predicted_ms"] / row["measured_ms"] - 1)) < 1e-9
        assert f"{row['error'] * 100:+.0f}%" in printed
    within = sum(row["within_goal"] for row in rows)
    assert f"{within} of {len(rows)} within 20%" in printed
    engine_8b = [row for row in rows if "engine_speed" in row["group"] and "llama-3-8b" in row["config"]]
    assert len(engine_8b) == 7 and all(row["within_goal"] for row in engine_8b), engine_8b

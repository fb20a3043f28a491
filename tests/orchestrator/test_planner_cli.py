"""`pdcluster plan` / `pdcluster calibrate`: output, exit codes, --write into cluster.yaml, calibration files."""

import argparse
import io
import json

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.planner import cli
from orchestrator.planner.hardware import (BUILTIN_GPUS, H200, FILE_FORMAT, HardwareError, builtin_gpu,
                                           load_hardware, save_hardware)
from orchestrator.planner.traffic import LengthDistribution, Traffic


def parse(argv):
    parser = argparse.ArgumentParser(prog="pdcluster")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(argv):
    args = parse(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_plan_prints_candidates_with_figures_and_the_chosen_tiers():
    code, out, err = run(["plan", "--preset", "gpt3-175b", "--ttft-ms", "1000", "--tpot-ms", "35"])
    assert code == 0, err
    assert "prefill candidates" in out and "decode candidates" in out
    assert "CHOSEN" in out and "rejected: memory" in out and "rejected: TPOT" in out
    assert "decode : 1 replica of tp=8 cp=1 pp=1 ep=1 on H200 (8 GPUs)" in out
    assert "KV transfer" in out and "req/s per GPU" in out
    assert "measured on the project's 2 x H200 machine" in out


def test_plan_refuses_impossible_targets_with_exit_1():
    code, out, err = run(["plan", "--preset", "llama-3-8b", "--gpu", "H100", "--ttft-ms", "500", "--tpot-ms", "0.5"])
    assert code == 1 and out == ""
    assert "no deployment meets the targets (tpot)" in err and "TPOT target 0.5 ms" in err


@pytest.mark.parametrize("argv,expected", [
    (["plan", "--preset", "llama-3-8b", "--ttft-ms", "500"], "--tpot-ms: the latency target is required"),
    (["plan", "--preset", "no-such-model", "--ttft-ms", "1", "--tpot-ms", "1"], "unknown model preset"),
    (["plan", "--preset", "llama-3-8b", "--gpu", "B200", "--ttft-ms", "1", "--tpot-ms", "1"], "unknown GPU 'B200'"),
    (["plan", "--preset", "llama-3-8b", "--input-len", "ten", "--ttft-ms", "1", "--tpot-ms", "1"], "input_len"),
    (["plan", "--preset", "llama-3-8b", "--gpu", "H200", "--gpu", "h200", "--ttft-ms", "1", "--tpot-ms", "1"],
     "given twice"),
])
def test_plan_bad_input_exits_2_with_a_message(argv, expected):
    code, out, err = run(argv)
    assert code == 2 and expected in err


def test_plan_reads_a_model_directory_and_a_traffic_file(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    from mesh.presets import PRESETS

    (model_dir / "config.json").write_text(json.dumps({**PRESETS["llama-3-8b"], "torch_dtype": "bfloat16"}))
    traffic_file = tmp_path / "traffic.yaml"
    traffic_file.write_text("rate: 4\ninput_len: 512-2048\noutput_len: 128\nttft_ms: 400\ntpot_ms: 40\n")
    code, out, err = run(["plan", "--model", str(model_dir), "--traffic", str(traffic_file), "--rate", "8"])
    assert code == 0, err
    assert "model (8.0B parameters" in out and "traffic: 8 req/s, input mean 1280, max 2048 tokens" in out
    traffic_file.write_text("rate: 4\nburst: 3\n")
    code, _, err = run(["plan", "--model", str(model_dir), "--traffic", str(traffic_file)])
    assert code == 2 and "unknown keys ['burst']" in err


def test_write_round_trips_through_load_config_keeping_the_rest(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    original = {
        "model": {"path": "models/tiny", "preset": "tiny-llama", "dtype": "bfloat16"},
        "router": {"port": 6000, "policy": "round-robin"},
        "prefill": {"replicas": 3, "max_replicas": 2, "min_replicas": 2, "max_batch_tokens": 2048,
                    "resources": {"num_cpus": 2, "custom": {"fast_disk": 1}}},
        "decode": {"replicas": 1, "num_kv_blocks": 512, "mesh": {"tp": 4}},
        "kv_transfer": {"lease_s": 12},
    }
    cluster.write_text(yaml.safe_dump(original, sort_keys=False))
    code, out, err = run(["plan", "--preset", "tiny-llama", "--input-len", "100", "--output-len", "20",
                          "--rate", "1", "--ttft-ms", "1000", "--tpot-ms", "100", "--write", str(cluster)])
    assert code == 0, err
    assert f"wrote the prefill and decode tiers to {cluster}" in out
    assert "prefill.min_replicas lowered from 2 to 1" in err
    config = load_config(cluster)
    for tier in (config.prefill, config.decode):
        assert tier.replicas == 1 and (tier.mesh.tp, tier.mesh.cp, tier.mesh.pp, tier.mesh.ep) == (1, 1, 1, 1)
        assert tier.resources["num_gpus"] == 1.0 and tier.resources["accelerator_type"] == "H200"
    assert config.prefill.resources["custom"] == {"fast_disk": 1}  # not the plan's: kept
    assert (config.router.port, config.router.policy) == (6000, "round-robin")
    assert config.prefill.max_batch_tokens == 2048 and config.decode.num_kv_blocks == 512
    assert config.kv_transfer.lease_s == 12
    written = yaml.safe_load(cluster.read_text())
    assert list(written) == list(original)  # sections keep their order
    assert list(written["prefill"])[:3] == ["replicas", "max_replicas", "min_replicas"]
    assert cluster.read_text().startswith("# Tiers written by `pdcluster plan`")


def test_write_a_multi_rank_plan_into_a_new_file(tmp_path):
    cluster = tmp_path / "new.yaml"
    code, out, err = run(["plan", "--preset", "gpt3-175b", "--ttft-ms", "1000", "--tpot-ms", "35",
                          "--write", str(cluster)])
    assert code == 0, err
    written = yaml.safe_load(cluster.read_text())
    assert written["decode"]["mesh"] == {"tp": 8, "cp": 1, "pp": 1, "ep": 1}
    assert written["decode"]["resources"] == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H200"}
    assert set(written) >= {"model", "router", "prefill", "decode", "kv_transfer", "ray"}  # from the default
    assert "mesh: {tp: 8, cp: 1, pp: 1, ep: 1}" in cluster.read_text()
    try:  # whether multi-rank meshes load depends on the release; a refusal must be reported, not hidden
        load_config(cluster)
    except ValueError as error:
        assert f"note: the written file does not load in this release: {error}" in err


def test_write_refuses_an_existing_file_that_is_invalid_elsewhere(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("model: {path: m}\nrouter: {port: 99999}\n")
    code, _, err = run(["plan", "--preset", "tiny-llama", "--input-len", "10", "--output-len", "5",
                        "--ttft-ms", "1000", "--tpot-ms", "100", "--write", str(cluster)])
    assert code == 2 and "router.port" in err
    assert cluster.read_text() == "model: {path: m}\nrouter: {port: 99999}\n"


def test_calibrate_on_cpu_writes_a_file_the_planner_reads(tmp_path):
    hardware = tmp_path / "hw.json"
    code, out, err = run(["calibrate", "--device", "cpu", "--quick", "--output", str(hardware)])
    assert code == 0, err
    assert "matmul:" in out and "copy:" in out
    spec = load_hardware(hardware)
    assert spec.name == "cpu" and not spec.is_gpu and spec.accelerator_type is None
    assert {"matmul_flops", "hbm_bytes_per_s", "attention_flops", "kernel_latency_s"} <= set(spec.measured)
    assert "kernel:" in out and 0 < spec.kernel_latency_s < 1e-3  # one small op's dispatch on CPU
    assert "p2p_bytes_per_s" not in spec.measured  # one device: assumed, and marked so
    assert spec.matmul_flops > 1e6 and spec.hbm_bytes_per_s > 1e6 and spec.memory_bytes > 2**28
    code, out, err = run(["plan", "--preset", "tiny-llama", "--hardware", str(hardware), "--input-len", "64",
                          "--output-len", "16", "--ttft-ms", "10000", "--tpot-ms", "1000"])
    assert code == 0, err
    assert "on cpu (1 GPU)" in out


def test_hardware_files_round_trip_and_name_bad_keys(tmp_path):
    path = tmp_path / "h200.json"
    save_hardware(H200, path)
    assert load_hardware(path) == H200
    raw = json.loads(path.read_text())
    raw["hbm_bytes_per_s"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(HardwareError, match="hbm_bytes_per_s must be > 0"):
        load_hardware(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(HardwareError, match=f"expected {FILE_FORMAT!r}"):
        load_hardware(path)


def test_builtin_table_marks_datasheet_figures():
    assert builtin_gpu("h100").name == "H100-SXM" and builtin_gpu("A100").name == "A100-80GB"
    for name, spec in BUILTIN_GPUS.items():
        if name == "H200":
            assert spec.is_measured and spec.hbm_bytes_per_s == 4.22e12 and spec.matmul_flops == 790e12
        else:
            assert not spec.is_measured and spec.source.startswith("datasheet-derived, not measured")
    # Same compute die as the H200: the same achievable matmul rate; slower memory.
    assert BUILTIN_GPUS["H100-SXM"].matmul_flops == pytest.approx(790e12, rel=1e-3)
    assert BUILTIN_GPUS["H100-SXM"].hbm_bytes_per_s < H200.hbm_bytes_per_s


def test_length_distributions_and_traffic():
    weighted = LengthDistribution.parse("256:0.7,4096:0.3")
    assert weighted.mean == pytest.approx(0.7 * 256 + 0.3 * 4096)
    assert weighted.quantile(0.5) == 256 and weighted.quantile(0.9) == 4096
    uniform = LengthDistribution.parse("100-200")
    assert uniform.values[0] == 100 and uniform.max == 200 and uniform.mean == pytest.approx(150, abs=1)
    with pytest.raises(ValueError, match="cannot read"):
        LengthDistribution.parse("200-100")
    traffic = Traffic.from_mapping({"rate": 2, "input_len": 10, "output_len": "1:0.5,3:0.5", "ttft_ms": 100,
                                    "tpot_ms": 10})
    assert traffic.mean_decode_steps == 1.0 and traffic.ttft_target_s == 0.1
    with pytest.raises(ValueError, match="must be > 0"):
        Traffic.from_mapping({"rate": 0, "input_len": 1, "output_len": 1, "ttft_ms": 1, "tpot_ms": 1})


@pytest.mark.slow
def test_calibrate_measures_collectives_over_two_gloo_processes(tmp_path):
    hardware = tmp_path / "hw.json"
    code, out, err = run(["calibrate", "--device", "cpu", "--quick", "--world-size", "2", "--output", str(hardware)])
    assert code == 0, err
    assert "all-reduce over 2" in out
    spec = load_hardware(hardware)
    assert {"allreduce_bus_bytes_per_s", "collective_latency_s", "p2p_bytes_per_s"} <= set(spec.measured)
    assert spec.allreduce_bus_bytes_per_s > 0 and 0 < spec.collective_latency_s < 1

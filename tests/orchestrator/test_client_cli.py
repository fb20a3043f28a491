"""`pdcluster generate` and `pdcluster status` helpers against a router over the fake backend."""

import argparse
import io
import json

import pytest
from router_harness import RunningRouter

from orchestrator import cli_client
from orchestrator.client import Client


@pytest.fixture(scope="module")
def router():
    with RunningRouter() as running:
        yield running


def parse(add_args, argv):
    parser = argparse.ArgumentParser(prog="pdcluster")
    add_args(parser)
    return parser.parse_args(argv)


def run(runner, args):
    out, err = io.StringIO(), io.StringIO()
    exit_code = runner(args, out=out, err=err)
    return exit_code, out.getvalue(), err.getvalue()


def test_generate_streams_text_and_summarises(router):
    args = parse(cli_client.add_generate_args, ["hello world", "--address", router.address, "--max-tokens", "12",
                                                "--stop", "xyz", "--stop", "orl", "--seed", "3", "--top-k", "4"])
    exit_code, out, err = run(cli_client.run_generate, args)
    assert exit_code == 0
    assert out == "hello w\n"
    assert err.startswith("finish=stop prompt_tokens=11 completion_tokens=10 ttft=")
    assert "tpot=" in err and "replicas=fake-prefill-0->fake-decode-0" in err
    spec = router.backend.specs[-1]
    assert spec.stop == ("xyz", "orl") and spec.params.seed == 3 and spec.params.top_k == 4


def test_generate_from_token_ids(router):
    args = parse(cli_client.add_generate_args, ["--address", router.address, "--token-ids", "72, 105", "--max-tokens", "3"])
    assert args.token_ids == [72, 105]
    exit_code, out, _ = run(cli_client.run_generate, args)
    assert (exit_code, out) == (0, "HiH\n")


def test_generate_reports_a_refused_request(router):
    args = parse(cli_client.add_generate_args, ["hi", "--address", router.address, "--top-p", "2"])
    exit_code, _, err = run(cli_client.run_generate, args)
    assert exit_code == 1
    assert "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1], got 2.0" in err


def test_generate_needs_exactly_one_prompt_form(router):
    neither = parse(cli_client.add_generate_args, ["--address", router.address])
    both = parse(cli_client.add_generate_args, ["hi", "--token-ids", "1", "--address", router.address])
    for args in (neither, both):
        exit_code, _, err = run(cli_client.run_generate, args)
        assert exit_code == 2 and "exactly one of PROMPT and --token-ids" in err


@pytest.mark.parametrize("bad", ["1,x", ","])
def test_bad_token_ids_are_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as caught:
        parse(cli_client.add_generate_args, ["--token-ids", bad])
    assert caught.value.code == 2
    assert "--token-ids" in capsys.readouterr().err


def test_status_table_and_json(router):
    exit_code, out, _ = run(cli_client.run_status, parse(cli_client.add_status_args, ["--address", router.address]))
    assert exit_code == 0
    lines = out.splitlines()
    assert lines[0] == "model fake-model  context 256 tokens  router in flight 0"
    assert lines[2].split()[:3] == ["tier", "replica", "state"]
    assert lines[3].split()[:3] == ["prefill", "fake-prefill-0", "ready"]
    assert lines[4].split() == ["decode", "fake-decode-0", "ready", "127.0.0.1", "cpu", "1/1/1/1", "0", "0", "64/64"]

    exit_code, out, _ = run(cli_client.run_status, parse(cli_client.add_status_args, ["--address", router.address, "--json"]))
    assert exit_code == 0
    with Client(router.address) as client:
        assert json.loads(out) == client.status()


def test_status_of_an_unreachable_router_fails_cleanly():
    args = parse(cli_client.add_status_args, ["--address", "127.0.0.1:1", "--timeout", "2"])
    exit_code, out, err = run(cli_client.run_status, args)
    assert exit_code == 1 and out == "" and "UNAVAILABLE" in err

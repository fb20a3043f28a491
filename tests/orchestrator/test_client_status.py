"""The Status message <-> dict codec shared by the router and the client SDK."""

import pytest

from orchestrator.client_status import StatusFormatError, status_from_proto, status_to_proto


def replica(replica_id, state="ready"):
    return {
        "id": replica_id, "state": state, "node": "10.0.0.7", "accelerator": "H100",
        "mesh": {"tp": 2, "cp": 4, "pp": 1, "ep": 1},
        "load": {"num_queued": 3, "num_running": 5},
        "kv_blocks": {"num_free": 100, "num_total": 4096},
        "failures": 2,
        "restarts": 1,
    }


def test_round_trip_keeps_every_field():
    status = {
        "model": "tiny-llama",
        "prefill": [replica("prefill-0"), replica("prefill-1", "starting")],
        "decode": [replica("decode-0", "draining"), replica("decode-1", "dead")],
    }
    message = status_to_proto(status, max_context_len=2048, num_inflight=7)
    decoded = status_from_proto(type(message).FromString(message.SerializeToString()))
    assert decoded == {**status, "max_context_len": 2048, "num_inflight": 7}


@pytest.mark.parametrize(
    "status, words",
    [
        ({"prefill": [], "decode": []}, "status: missing key 'model'"),
        ({"model": "m", "prefill": [], "decode": [{"id": "d0"}]}, "status.decode[0]: missing key 'state'"),
        ({"model": "m", "prefill": [{**replica("p0"), "load": {"num_queued": 1}}], "decode": []},
         "status.prefill[0].load: missing key 'num_running'"),
        ({"model": "m", "prefill": ["p0"], "decode": []}, "status.prefill[0]: expected a dict, got str"),
        ({"model": "m", "prefill": [replica("p0", "unspecified2")], "decode": []}, "unknown replica state"),
    ],
)
def test_malformed_status_names_the_key(status, words):
    with pytest.raises(StatusFormatError, match=words.replace("[", r"\[").replace("]", r"\]")):
        status_to_proto(status, max_context_len=16, num_inflight=0)

"""Per-request communication accounting end to end: client -> gRPC router -> a tp=2 prefill replica -> a tp=2 decode
replica; the final response's timings carry each tier's collective bytes by kind, equal to the closed forms of
orchestrator/planner/volumes.py for that request (one request at a time, so no step is shared)."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.parallel import MeshShape
from orchestrator.client import Client
from orchestrator.config import MeshSection
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.volumes import request_volumes
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, make_model_dir

pytestmark = pytest.mark.slow

RANK_RESOURCES = {"num_cpus": 0.25}
REQUESTS = ((9, 5), (30, 3))  # (prompt tokens Sp, generated tokens Sd)


def _as_ints(volumes) -> dict[str, int]:
    return {kind: int(v) for kind, v in volumes.as_dict().items() if v}


def test_final_timings_carry_the_closed_form_comm_bytes(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir)
    config = dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, mesh=MeshSection(tp=2), resources=RANK_RESOURCES),
        decode=dataclasses.replace(config.decode, mesh=MeshSection(tp=2), resources=RANK_RESOURCES),
    )
    bytes_per_element = {"float32": 4, "bfloat16": 2, "float16": 2}[config.model.dtype]
    shape = ModelShape.from_dir(model_dir, dtype_bytes=bytes_per_element)
    with RunningCluster(config) as cluster:
        with Client(cluster.address) as client:
            for prompt_len, output_len in REQUESTS:
                chunks = list(client.generate(token_ids=list(range(10, 10 + prompt_len)), max_tokens=output_len,
                                              ignore_eos=True))
                timings = chunks[-1].timings
                assert sum(len(c.token_ids) for c in chunks) == output_len
                expected = request_volumes(shape, MeshShape(tp=2), MeshShape(tp=2), prompt_len=prompt_len,
                                           output_len=output_len)
                assert timings["prefill_comm_bytes"] == _as_ints(expected["prefill"]), (prompt_len, output_len)
                assert timings["decode_comm_bytes"] == _as_ints(expected["decode"]), (prompt_len, output_len)
                assert timings["prefill_comm_bytes"]["tp_allreduce"] > 0
                assert timings["kv_bytes"] >= shape.kv_bytes_per_token * prompt_len  # whole KV blocks travel

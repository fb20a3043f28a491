import json

import pytest
import torch.distributed as dist

from mesh.config import ModelConfig
from mesh.parallel import MeshShape, ParallelDims
from mesh.presets import PRESETS


def _config(preset: str = "tiny-llama", **overrides) -> ModelConfig:
    raw = json.loads(json.dumps(PRESETS[preset]))
    raw.update(overrides)
    return ModelConfig.from_hf_dict(raw)


def test_world_size_and_coordinates_tp_fastest():
    shape = MeshShape(tp=2, cp=2, pp=2)
    assert shape.world_size == 8
    assert shape.coords(5) == {"pp": 1, "cp": 0, "tp": 1}
    assert all(shape.rank_of(**shape.coords(r)) == r for r in range(8))
    assert shape.axis_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shape.axis_groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert shape.axis_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_ep_spans_the_cp_tp_submesh_of_a_stage():
    shape = MeshShape(tp=2, cp=2, pp=2, ep=4)
    assert shape.axis_groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="ep=3"):
        MeshShape(tp=2, cp=2, ep=3)


@pytest.mark.parametrize("bad", [{"tp": 0}, {"pp": -1}, {"cp": 1.5}, {"tp": True}])
def test_degrees_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MeshShape(**bad)


def test_validate_accepts_splits_the_model_allows():
    config = _config()  # 4 heads, 2 KV heads, 4 layers
    for shape in (MeshShape(), MeshShape(tp=2), MeshShape(tp=4), MeshShape(pp=4), MeshShape(tp=2, cp=4, pp=2)):
        shape.validate(config)  # tp=4 > 2 KV heads: each KV head replicated on 2 ranks


@pytest.mark.parametrize(("shape", "named", "fix"), [
    (MeshShape(tp=3), "tp=3", r"use a tp in \[1, 2, 4\]"),
    (MeshShape(tp=8), "tp=8", "use a tp in"),
    (MeshShape(pp=5), "pp=5", "pp <= 4"),
    (MeshShape(tp=2, ep=2), "ep=2", "set ep to 1"),
])
def test_validate_names_degree_and_fix(shape, named, fix):
    with pytest.raises(ValueError, match=named) as error:
        shape.validate(_config())
    assert error.match(fix)


def test_validate_vocab_and_intermediate_divisibility():
    with pytest.raises(ValueError, match="vocab_size"):
        MeshShape(tp=2).validate(_config(vocab_size=511))
    with pytest.raises(ValueError, match="intermediate_size"):
        MeshShape(tp=2).validate(_config(intermediate_size=127))


def test_single_rank_touches_no_distributed_state(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed used by a one-rank mesh")

    for name in ("new_group", "is_initialized", "get_world_size", "get_rank"):
        monkeypatch.setattr(dist, name, forbidden)
    dims = ParallelDims.single()
    assert (dims.tp_size, dims.cp_size, dims.pp_size, dims.ep_size, dims.world_size) == (1, 1, 1, 1, 1)
    assert (dims.tp_rank, dims.cp_rank, dims.pp_rank, dims.ep_rank) == (0, 0, 0, 0)
    assert dims.tp_group is None and dims.cp_group is None and dims.pp_group is None and dims.ep_group is None


def test_multi_rank_mesh_needs_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelDims(MeshShape(tp=2), 0)

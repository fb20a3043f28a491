"""A rank's device from the GPUs Ray assigned it, and the backend of its model collectives."""

from __future__ import annotations

import pytest
import torch

from mesh.rank_device import collective_backend, local_cuda_index, rank_device


def test_a_cpu_tier_computes_on_the_cpu_whatever_ray_assigned():
    assert rank_device([], use_gpu=False) == torch.device("cpu")
    assert rank_device([3], use_gpu=False) == torch.device("cpu")


def test_a_gpu_tier_without_an_assigned_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match="num_gpus"):
        rank_device([], use_gpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_a_gpu_tier_on_a_cpu_torch_fails_clearly():
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        rank_device([0], use_gpu=True)


def test_ray_gpu_ids_map_through_cuda_visible_devices():
    assert local_cuda_index(5, "5") == 0  # Ray restricted the actor to its GPU
    assert local_cuda_index(5, "2, 5") == 1
    assert local_cuda_index("1", None) == 1  # nothing hidden: the id is the ordinal
    assert local_cuda_index(1, "") == 1
    with pytest.raises(RuntimeError, match="hides it"):
        local_cuda_index(3, "0,1")


def test_collectives_use_nccl_between_gpus_and_gloo_between_cpus():
    assert collective_backend(torch.device("cuda", 1)) == "nccl"
    assert collective_backend(torch.device("cpu")) == "gloo"

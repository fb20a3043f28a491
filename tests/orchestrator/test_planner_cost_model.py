"""The planner's cost model: the seeds' 175B worked example, memory per GPU, roofline times, collectives."""

import math

import pytest

from mesh.parallel import MeshShape
from orchestrator.planner.cost_model import (KERNELS_PER_LAYER, all_gather_s, all_reduce_s, decode_step_time,
                                             eager_glue_bytes_per_token_per_layer, glue_bytes_per_token_per_layer,
                                             kv_bytes_per_token_per_gpu,
                                             kv_transfer_time, layer_weight_bytes_per_gpu, prefill_time,
                                             stage_layer_counts, stage_weight_bytes, weight_bytes_per_gpu)
from orchestrator.planner.hardware import H200
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.volumes import (collectives_per_forward, request_volumes, ring_allreduce_wire_bytes,
                                          seed_tp_allreduce_bytes)

GPT3 = ModelShape.from_preset("gpt3-175b")  # FP16: 2 bytes per weight
TP8 = MeshShape(tp=8)
HYBRID = MeshShape(tp=2, pp=4)


def test_gpt3_175b_holds_350_gb_of_fp16_weights():
    assert GPT3.dtype_bytes == 2
    assert GPT3.num_params == pytest.approx(175e9, rel=0.01)
    assert GPT3.weight_bytes == pytest.approx(350e9, rel=0.01)


def test_seed_example_about_44_gb_per_gpu_under_tp8_and_tp2_x_pp4_alike():
    tp8, hybrid = weight_bytes_per_gpu(GPT3, TP8), weight_bytes_per_gpu(GPT3, HYBRID)
    assert tp8 == pytest.approx(350e9 / 8, rel=0.02)
    assert hybrid == pytest.approx(350e9 / 8, rel=0.02)
    # The guide's 88 GB for the hybrid is 350 / 4: it forgot that each stage's layers are also split over tp=2.
    assert hybrid < 0.6 * 88e9
    # Each pipeline stage holds a quarter of the layers over two tp ranks; the end stages add the vocabulary table
    # (a tied head needs its own copy on the last stage).
    stages = stage_weight_bytes(GPT3, HYBRID)
    assert len(stages) == 4 and stages[0] == pytest.approx(stages[3]) and stages[1] == pytest.approx(stages[2])
    table = GPT3.vocab_size * GPT3.hidden_size / 2 * 2  # V x h over tp=2, 2 bytes each
    assert stages[0] - stages[1] == pytest.approx(table)
    assert stages[3] - stages[1] == pytest.approx(table + GPT3.hidden_size * 2)  # + the final norm


def test_seed_example_differs_in_collectives_two_allreduces_per_layer_over_8_vs_over_2_plus_3_handoffs():
    tp8, hybrid = collectives_per_forward(GPT3, TP8), collectives_per_forward(GPT3, HYBRID)
    assert (tp8.num_allreduces, tp8.allreduce_group_size, tp8.num_stage_handoffs) == (2 * 96 + 1, 8, 0)
    assert (hybrid.num_allreduces, hybrid.allreduce_group_size, hybrid.num_stage_handoffs) == (2 * 96 + 1, 2, 3)
    assert stage_layer_counts(96, 4) == [24, 24, 24, 24]  # so 2 x 24 all-reduces per stage (+1 on the first)


def test_seed_example_communication_volumes():
    prompt, output, h, e = 1024, 256, GPT3.hidden_size, 2
    tokens = prompt + output - 1
    for mesh, t in ((TP8, 8), (HYBRID, 2)):
        volumes = request_volumes(GPT3, mesh, mesh, prompt_len=prompt, output_len=output)
        per_rank_payload = (volumes["prefill"].tp_allreduce + volumes["decode"].tp_allreduce) / (t * mesh.pp)
        # Per rank of a tp group the all-reduce payload is the same on every stage of the hybrid (the embedding's
        # all-reduce sits on the first), so over the mesh it sums to the seeds' count for one tp group.
        assert ring_allreduce_wire_bytes(per_rank_payload * mesh.pp, t) == pytest.approx(
            seed_tp_allreduce_bytes(num_layers=96, prompt_len=prompt, output_len=output, hidden_size=h,
                                    dtype_bytes=e, tp=t), rel=1e-12)
    tp8 = request_volumes(GPT3, TP8, TP8, prompt_len=prompt, output_len=output)
    hybrid = request_volumes(GPT3, HYBRID, HYBRID, prompt_len=prompt, output_len=output)
    assert tp8["prefill"].pp_send == 0
    # 3 hand-offs of [tokens, h] per tp rank: one tensor, the hidden state (no separate residual).
    assert hybrid["prefill"].pp_send + hybrid["decode"].pp_send == 3 * tokens * h * e * 2
    # The hybrid moves far less in all-reduces: (t-1)/t shrinks and every stage's group is 2 ranks, not 8.
    tp8_wire = ring_allreduce_wire_bytes(tp8["prefill"].tp_allreduce / 8, 8)
    hybrid_wire = ring_allreduce_wire_bytes(hybrid["prefill"].tp_allreduce / 8, 2)
    assert hybrid_wire < tp8_wire / 2


def test_seed_example_differs_in_latency():
    tp8_prefill = prefill_time(GPT3, TP8, H200, num_tokens=1024)
    hybrid_prefill = prefill_time(GPT3, HYBRID, H200, num_tokens=1024)
    # One prompt crosses 4 stages one after the other, each with a quarter of the layers on 2 GPUs: slower...
    assert tp8_prefill.latency_s < hybrid_prefill.latency_s
    assert hybrid_prefill.pp_comm_s > 0 and tp8_prefill.pp_comm_s == 0
    # ...but a full pipeline takes a new prompt every stage time.
    assert hybrid_prefill.bottleneck_stage_s < hybrid_prefill.latency_s / 3
    tp8_step = decode_step_time(GPT3, TP8, H200, batch_size=1, context_len=1024)
    hybrid_step = decode_step_time(GPT3, HYBRID, H200, batch_size=1, context_len=1024)
    assert tp8_step.latency_s < hybrid_step.latency_s
    # Decode is bound by reading the weights: 350 GB / 8 GPUs at 4.22 TB/s is about 10 ms, on every step.
    assert tp8_step.memory_bound_s == pytest.approx(GPT3.weight_bytes / 8 / H200.hbm_bytes_per_s, rel=0.03)


def test_decode_reads_weights_and_kv_prefill_computes():
    llama = ModelShape.from_preset("llama-3-8b")
    mesh = MeshShape()
    step = decode_step_time(llama, mesh, H200, batch_size=1, context_len=1)
    streamed = weight_bytes_per_gpu(llama, mesh) - llama.embedding_params * 2  # the embedding is only indexed
    kernels = (KERNELS_PER_LAYER * 32 + 3) * H200.kernel_latency_s  # + embedding, final norm, head
    assert step.kernel_s == pytest.approx(kernels)
    assert step.memory_bound_s == pytest.approx(streamed / H200.hbm_bytes_per_s, rel=0.01)
    assert step.latency_s == pytest.approx(streamed / H200.hbm_bytes_per_s + kernels, rel=0.01)
    bigger = decode_step_time(llama, mesh, H200, batch_size=64, context_len=4096)
    kv_read = 64 * 4096 * llama.kv_bytes_per_token
    # Projections and attention are separate kernels: weights, then KV, each at the memory rate (both memory-bound
    # at batch 64), plus the element-wise kernels' bytes and the fixed kernel time.
    assert bigger.attention_s == pytest.approx(kv_read / H200.hbm_bytes_per_s)
    glue = 64 * 32 * glue_bytes_per_token_per_layer(llama, mesh) / H200.hbm_bytes_per_s
    assert bigger.glue_s == pytest.approx(glue)
    assert bigger.latency_s == pytest.approx((streamed + kv_read) / H200.hbm_bytes_per_s + glue + kernels, rel=0.02)
    prefill = prefill_time(llama, mesh, H200, num_tokens=8192)
    linear_flops = 2 * 8192 * llama.num_layers * llama.active_linear_params_per_layer
    assert prefill.linear_s == pytest.approx(linear_flops / H200.matmul_flops, rel=0.02)
    attention_flops = 4 * 128 * 32 * 8192 * (8192 / 2) * 32
    assert prefill.attention_s == pytest.approx(attention_flops / H200.attention_flops, rel=1e-6)


def test_context_parallel_splits_prefill_attention():
    llama = ModelShape.from_preset("llama-3-8b")
    alone = prefill_time(llama, MeshShape(), H200, num_tokens=32768)
    ring = prefill_time(llama, MeshShape(cp=4), H200, num_tokens=32768)
    assert ring.attention_s == pytest.approx(alone.attention_s / 4, rel=1e-6)
    assert ring.latency_s < alone.latency_s / 2


def test_kv_bytes_per_gpu_follow_tp_head_split_and_replication():
    llama = ModelShape.from_preset("llama-3-8b")  # 32 layers, 8 KV heads of 128
    assert llama.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token_per_gpu(llama, MeshShape(tp=2)) == llama.kv_bytes_per_token / 2
    # tp=16 > 8 KV heads: each rank keeps one (replicated) head, not half of one.
    assert kv_bytes_per_token_per_gpu(llama, MeshShape(tp=16)) == llama.kv_bytes_per_token / 8
    assert kv_bytes_per_token_per_gpu(llama, MeshShape(cp=4)) == llama.kv_bytes_per_token / 4
    assert kv_bytes_per_token_per_gpu(llama, MeshShape(pp=4)) == llama.kv_bytes_per_token / 4


def test_experts_divide_over_ep_whole_or_over_tp_split():
    mixtral = ModelShape.from_preset("tiny-mixtral")
    assert mixtral.is_moe and mixtral.num_experts == 4 and mixtral.num_experts_per_token == 2
    expert_bytes = mixtral.mlp_params_per_expert * 2
    # 4 experts over tp=2 (each split in half) or over ep=2 (two whole ones each): the same bytes per GPU.
    assert layer_weight_bytes_per_gpu(mixtral, MeshShape(tp=2)) == pytest.approx(
        layer_weight_bytes_per_gpu(mixtral, MeshShape(tp=2, ep=2)))
    # cp=2 replicates the layer; ep=2 over the same two ranks halves the experts each one holds.
    assert layer_weight_bytes_per_gpu(mixtral, MeshShape(cp=2)) - layer_weight_bytes_per_gpu(
        mixtral, MeshShape(cp=2, ep=2)) == pytest.approx(2 * expert_bytes)


def test_collective_time_is_latency_plus_wire_bytes_over_bandwidth():
    payload = 64 * 2**20
    assert all_reduce_s(H200, payload, 1) == 0.0
    assert all_reduce_s(H200, payload, 2) == pytest.approx(
        H200.collective_latency_s + payload / H200.allreduce_bus_bytes_per_s)
    assert all_reduce_s(H200, payload, 8) == pytest.approx(
        H200.collective_latency_s + payload * 2 * 7 / 8 / H200.allreduce_bus_bytes_per_s)
    assert all_gather_s(H200, payload, 4) == pytest.approx(
        H200.collective_latency_s + payload * 3 / 4 / H200.allreduce_bus_bytes_per_s)


def test_kv_transfer_time_layerwise_hides_behind_the_prefill():
    llama = ModelShape.from_preset("llama-3-8b")
    slow_prefill = kv_transfer_time(llama, num_tokens=4096, link_bytes_per_s=50e9, prefill_latency_s=1.0)
    assert slow_prefill.num_bytes == 4096 * llama.kv_bytes_per_token
    assert slow_prefill.total_s == pytest.approx(slow_prefill.num_bytes / 50e9)
    # Only the last layer's share is left once the prefill ends.
    assert slow_prefill.exposed_s == pytest.approx(slow_prefill.total_s / llama.num_layers)
    after = kv_transfer_time(llama, num_tokens=4096, link_bytes_per_s=50e9, prefill_latency_s=1.0,
                             is_layerwise=False)
    assert after.exposed_s == after.total_s
    fast_prefill = kv_transfer_time(llama, num_tokens=4096, link_bytes_per_s=50e9, prefill_latency_s=0.0)
    assert math.isclose(fast_prefill.exposed_s, fast_prefill.total_s)


def test_a_tied_head_streams_the_embedding_table_each_decode_step():
    tied = ModelShape.from_preset("llama-3.2-1b")
    assert tied.tie_word_embeddings
    table = tied.vocab_size * tied.hidden_size * tied.dtype_bytes
    one_stage = decode_step_time(tied, MeshShape(), H200, batch_size=1, context_len=1)
    # Weights read = every weight once (the shared table as the head), not the layers alone.
    assert one_stage.memory_bound_s * H200.hbm_bytes_per_s == pytest.approx(weight_bytes_per_gpu(tied, MeshShape()),
                                                                          rel=1e-3)
    assert one_stage.memory_bound_s * H200.hbm_bytes_per_s > table
    # With stages, the first one only indexes its table and the last streams its own copy.
    staged = decode_step_time(tied, MeshShape(pp=2), H200, batch_size=1, context_len=1)
    first, last = stage_weight_bytes(tied, MeshShape(pp=2))
    assert staged.memory_bound_s * H200.hbm_bytes_per_s == pytest.approx(first - table + last, rel=1e-3)


def test_prefill_cp_mode_picks_the_ring_variant():
    llama = ModelShape.from_preset("llama-3-8b")
    mesh = MeshShape(cp=2)
    few_new = dict(num_tokens=1024, num_cached=131072)
    auto = prefill_time(llama, mesh, H200, **few_new)
    kv = prefill_time(llama, mesh, H200, cp_mode="pass-kv", **few_new)
    q = prefill_time(llama, mesh, H200, cp_mode="pass-q", **few_new)
    assert auto.latency_s == pytest.approx(min(kv.latency_s, q.latency_s))
    assert kv.latency_s != q.latency_s
    with pytest.raises(ValueError, match="cp_mode"):
        prefill_time(llama, mesh, H200, num_tokens=8, cp_mode="ring")


def test_glue_and_kernel_time_are_part_of_prefill():
    llama = ModelShape.from_preset("llama-3-8b")
    prefill = prefill_time(llama, MeshShape(), H200, num_tokens=2048)
    glue = 2048 * 32 * glue_bytes_per_token_per_layer(llama, MeshShape()) / H200.hbm_bytes_per_s
    assert prefill.glue_s == pytest.approx(glue)
    assert prefill.kernel_s == pytest.approx((KERNELS_PER_LAYER * 32 + 3) * H200.kernel_latency_s)
    # Per token and layer: 8h of norms and residuals, rotary and the cache write, 3I of SiLU * up, in bf16.
    assert glue_bytes_per_token_per_layer(llama, MeshShape()) == 2 * (8 * 4096 + 2 * (4096 + 1024) + 2 * 1024
                                                                      + 3 * 14336)


def test_the_eager_engine_moves_more_element_wise_bytes_than_the_fused_one():
    llama = ModelShape.from_preset("llama-3-8b")
    fused = glue_bytes_per_token_per_layer(llama, MeshShape())
    eager = eager_glue_bytes_per_token_per_layer(llama, MeshShape())
    # Two float32-upcasting RMSNorms (36h bytes each in bf16), residuals, 10 rotary passes over q and k, the cache
    # write, GQA expansion and the output concatenation, SiLU then * up.
    h, q, kv, i = 4096, 4096, 1024, 14336
    assert eager == 2 * 36 * h + 2 * (6 * h + 10 * (q + kv) + 4 * kv + 2 * (kv + q) + 2 * q + 5 * i)
    assert 3 < eager / fused < 4
    slow = prefill_time(llama, MeshShape(), H200, num_tokens=4096, engine="eager")
    fast = prefill_time(llama, MeshShape(), H200, num_tokens=4096)
    assert slow.latency_s - fast.latency_s == pytest.approx(slow.glue_s - fast.glue_s)
    with pytest.raises(ValueError, match="engine"):
        decode_step_time(llama, MeshShape(), H200, batch_size=1, context_len=8, engine="compiled")

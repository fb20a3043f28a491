"""Closed-form communication volumes (docs/planner.md): against the seeds' formulas for several (L, h, t, p, Sp, Sd),
and against the bytes the project's own layers and ring attention hand to torch.distributed (a recording stand-in
replaces the collectives, so the real code runs in one process and every call's tensor is counted)."""

import pytest
import torch
import torch.distributed as dist

from mesh.cp_sharding import PADDING, shard_plan
from mesh.layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from mesh.parallel import MeshShape
from mesh.ring_attention import ring_attention
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.volumes import (collectives_per_forward, cp_local_tokens, cp_real_rows,
                                          cp_rows_sent_to_owners, kv_transfer_bytes, one_shot_allreduce_wire_bytes,
                                          request_volumes, ring_allreduce_wire_bytes, seed_cp_block_elements,
                                          seed_pp_bytes, seed_tp_allreduce_bytes, step_volumes)


def shape(*, layers: int, hidden: int, heads: int = 8, kv_heads: int = 4, head_dim: int = 16, vocab: int = 256,
          dtype_bytes: int = 2, **moe) -> ModelShape:
    return ModelShape(name="test", num_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                      dtype_bytes=dtype_bytes, **moe)


CASES = [  # (L, h, t, p, Sp, Sd)
    (2, 64, 2, 1, 7, 1),
    (4, 128, 4, 2, 33, 9),
    (96, 12288, 8, 1, 1024, 256),
    (32, 4096, 2, 4, 4000, 1),
    (5, 96, 8, 5, 1, 17),
]


@pytest.mark.parametrize("num_layers,hidden,tp,pp,prompt,output", CASES)
def test_tp_allreduce_equals_the_seeds_formula_in_ring_wire_bytes(num_layers, hidden, tp, pp, prompt, output):
    model = shape(layers=num_layers, hidden=hidden)
    mesh = MeshShape(tp=tp, pp=pp)
    volumes = request_volumes(model, mesh, mesh, prompt_len=prompt, output_len=output)
    payload = volumes["prefill"].tp_allreduce + volumes["decode"].tp_allreduce
    # Summed over the mesh, divided by the tp ranks of one position in the pipeline: one tp group's payload,
    # 2L + 1 all-reduces of [tokens, h] (the embedding's included) over Sp + Sd - 1 tokens.
    per_group_rank = payload / tp
    assert per_group_rank == (2 * num_layers + 1) * (prompt + output - 1) * hidden * 2
    assert ring_allreduce_wire_bytes(per_group_rank, tp) == pytest.approx(
        seed_tp_allreduce_bytes(num_layers=num_layers, prompt_len=prompt, output_len=output, hidden_size=hidden,
                                dtype_bytes=2, tp=tp), rel=1e-12)
    # A one-shot all-reduce sends (t - 1) x payload per rank: t / 2 times the ring's.
    assert one_shot_allreduce_wire_bytes(per_group_rank, tp) == pytest.approx(
        ring_allreduce_wire_bytes(per_group_rank, tp) * tp / 2)


@pytest.mark.parametrize("num_layers,hidden,tp,pp,prompt,output", CASES)
def test_pp_sends_one_hidden_state_per_boundary_half_the_seeds_two(num_layers, hidden, tp, pp, prompt, output):
    model = shape(layers=num_layers, hidden=hidden)
    mesh = MeshShape(tp=tp, pp=pp)
    volumes = request_volumes(model, mesh, mesh, prompt_len=prompt, output_len=output)
    per_tp_position = (volumes["prefill"].pp_send + volumes["decode"].pp_send) / tp
    assert per_tp_position == (pp - 1) * (prompt + output - 1) * hidden * 2
    assert per_tp_position == seed_pp_bytes(prompt_len=prompt, output_len=output, hidden_size=hidden,
                                            dtype_bytes=2, pp=pp) / 2


@pytest.mark.parametrize("tp,prompt,output", [(2, 10, 1), (4, 100, 33), (8, 1, 5)])
def test_vocabulary_gather_covers_the_returned_rows_only(tp, prompt, output):
    model = shape(layers=3, hidden=64, vocab=512)
    mesh = MeshShape(tp=tp)
    volumes = request_volumes(model, mesh, mesh, prompt_len=prompt, output_len=output)
    # One row per forward: the prompt's last token, then one per decode step: Sd rows of V / t per rank.
    assert volumes["prefill"].tp_allgather + volumes["decode"].tp_allgather == output * 512 * 2
    assert step_volumes(model, MeshShape(), query_lens=[prompt]).total == 0  # one rank: nothing moves


def test_collective_counts_embedding_included_and_ep_drops_the_mlp_allreduce():
    dense = shape(layers=6, hidden=64)
    assert collectives_per_forward(dense, MeshShape(tp=2)).num_allreduces == 13
    assert collectives_per_forward(dense, MeshShape()).num_allreduces == 0
    moe = shape(layers=6, hidden=64, num_experts=4, num_experts_per_token=2)
    assert collectives_per_forward(moe, MeshShape(tp=2, ep=2)).num_allreduces == 7
    assert collectives_per_forward(moe, MeshShape(tp=2)).num_allreduces == 13


def test_pass_kv_block_is_k_and_v_of_the_seeds_block_in_bytes():
    model = shape(layers=1, hidden=64, heads=8, kv_heads=4, head_dim=16)
    cp, tokens = 4, 64  # 2N divides T: no padding
    volumes = step_volumes(model, MeshShape(cp=cp), query_lens=[tokens])
    per_send = volumes.cp_ring / (cp * (cp - 1))
    assert per_send == 2 * 2 * seed_cp_block_elements(num_tokens=tokens // cp, num_kv_heads=4, head_dim=16)


def test_kv_transfer_bytes_are_k_and_v_of_every_layer():
    model = shape(layers=3, hidden=64, kv_heads=4, head_dim=16)
    assert kv_transfer_bytes(model, 10) == 2 * 3 * 4 * 16 * 2 * 10


# --- against the code ---------------------------------------------------------------------------------------------

class Recorder:
    """Stands in for torch.distributed's collectives: records (kind, bytes) and fills outputs plausibly."""

    def __init__(self, monkeypatch, *, rank: int, world_size: int):
        self.calls: list[tuple[str, int]] = []
        self.rank, self.world_size = rank, world_size
        for name, fake in (("get_rank", lambda group=None: self.rank),
                           ("get_world_size", lambda group=None: self.world_size),
                           ("is_initialized", lambda: True),
                           ("all_reduce", self.all_reduce), ("all_gather", self.all_gather),
                           ("isend", self.isend), ("irecv", self.irecv), ("P2POp", self.p2p_op),
                           ("batch_isend_irecv", self.batch_isend_irecv),
                           ("all_to_all_single", self.all_to_all_single)):
            monkeypatch.setattr(dist, name, fake)

    def bytes_of(self, kind: str) -> int:
        return sum(size for k, size in self.calls if k == kind)

    def all_reduce(self, tensor, group=None, **_):
        self.calls.append(("all_reduce", tensor.numel() * tensor.element_size()))

    def all_gather(self, outputs, tensor, group=None, **_):
        self.calls.append(("all_gather", tensor.numel() * tensor.element_size()))
        for out in outputs:
            out.copy_(tensor)

    def isend(self, tensor, *_, **__):
        self.calls.append(("send", tensor.numel() * tensor.element_size()))

    def irecv(self, tensor, *_, **__):
        pass

    def p2p_op(self, op, tensor, group=None, group_peer=None, **_):
        return lambda: op(tensor)

    def batch_isend_irecv(self, ops):
        for op in ops:
            op()
        return []  # nothing to wait for

    def all_to_all_single(self, output, input, *args, group=None, **_):
        # Equal splits (as ring attention's pass-Q uses): the rank's own slice stays home.
        leaving = input.numel() * input.element_size() * (self.world_size - 1) // self.world_size
        self.calls.append(("all_to_all", leaving))
        output.copy_(input)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_hand_the_closed_form_payloads_to_their_collectives(monkeypatch, tp):
    tokens, hidden, vocab, rows = 6, 32, 64, 2
    recorder = Recorder(monkeypatch, rank=1, world_size=tp)
    group = object()  # any non-None group: the layers then communicate
    dtype = torch.bfloat16
    row = RowParallelLinear(hidden, hidden, bias=False, group=group, dtype=dtype)
    row(torch.zeros(tokens, hidden // tp, dtype=dtype))
    embedding = VocabParallelEmbedding(vocab, hidden, group=group, dtype=dtype)
    embedding(torch.arange(tokens))
    head = ParallelLMHead(vocab, hidden, group=group, dtype=dtype)
    head(torch.zeros(rows, hidden, dtype=dtype))
    assert recorder.calls == [("all_reduce", tokens * hidden * 2), ("all_reduce", tokens * hidden * 2),
                              ("all_gather", rows * vocab // tp * 2)]
    # The same figures make up step_volumes: 2L + 1 such all-reduces and one gather, on every tp rank.
    model = shape(layers=1, hidden=hidden, vocab=vocab, heads=4, kv_heads=4)
    volumes = step_volumes(model, MeshShape(tp=tp), query_lens=[tokens])
    assert volumes.tp_allreduce == 3 * tokens * hidden * 2 * tp
    assert volumes.tp_allgather == 1 * vocab * 2  # one sequence: its last row, V / t columns from each rank
    assert step_volumes(model, MeshShape(tp=tp), query_lens=[tokens, 1]).tp_allgather == \
        tp * recorder.bytes_of("all_gather")


RING_CASES = [  # (query_lens, context_lens, cp)
    ([16], [0], 2),
    ([7, 5], [0, 0], 2),
    ([9, 30, 1], [0, 0, 0], 4),
    ([6, 4], [5, 0], 2),
    ([3, 11], [7, 13], 4),
]


@pytest.mark.parametrize("mode", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("query_lens,context_lens,cp", RING_CASES)
def test_ring_attention_moves_exactly_the_closed_form_bytes(monkeypatch, mode, query_lens, context_lens, cp):
    heads, kv_heads, head_dim = 4, 2, 8
    plan = shard_plan(query_lens, cp, context_lens=context_lens)
    sent = all_to_all = 0
    for rank in range(cp):
        recorder = Recorder(monkeypatch, rank=rank, world_size=cp)
        rows = plan.num_local_tokens
        q = torch.randn(rows, heads, head_dim, dtype=torch.bfloat16)
        k, v = (torch.randn(rows, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))
        cached = {}
        if any(context_lens):
            cached_rows = plan.num_cached_local(rank)
            cached = dict(cached_k_local=torch.randn(cached_rows, kv_heads, head_dim, dtype=torch.bfloat16),
                          cached_v_local=torch.randn(cached_rows, kv_heads, head_dim, dtype=torch.bfloat16))
        ring_attention(q, k, v, plan, object(), mode=mode, **cached)
        sent += recorder.bytes_of("send")
        all_to_all += recorder.bytes_of("all_to_all")
    model = shape(layers=1, hidden=32, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    volumes = step_volumes(model, MeshShape(cp=cp), query_lens=query_lens, context_lens=context_lens,
                           cp_mode=mode)
    assert sent == volumes.cp_ring
    assert all_to_all == volumes.cp_all_to_all
    assert plan.num_local_tokens == cp_local_tokens(query_lens, cp)


@pytest.mark.parametrize("query_lens,context_lens,cp", RING_CASES)
def test_row_counts_match_the_sharding_plan(query_lens, context_lens, cp):
    plan = shard_plan(query_lens, cp, context_lens=context_lens)
    leaving = 0
    for rank in range(cp):
        is_real = plan.seq_ids[rank] != PADDING
        assert cp_real_rows(query_lens, cp, rank) == int(is_real.sum())
        owners = plan.positions[rank] % cp
        leaving += int((is_real & (owners != rank)).sum())
    assert cp_rows_sent_to_owners(query_lens, context_lens, cp) == leaving


def test_moe_expert_parallel_volumes():
    model = shape(layers=2, hidden=32, heads=4, kv_heads=4, num_experts=4, num_experts_per_token=2)
    volumes = step_volumes(model, MeshShape(tp=2, ep=2), query_lens=[10])
    # Expected rows out and back: every token to its 2 experts, half of them remote; plus 4 int64 counts a rank.
    assert volumes.ep_all_to_all == 2 * (2 * 10 * 2 * 32 * 2 * 0.5 + 2 * 4 * 8 * 0.5)
    # The two tp ranks route 5 rows each and all-gather them.
    assert volumes.ep_allgather == 2 * 2 * 5 * 32 * 2
    assert volumes.tp_allreduce == (2 + 1) * 10 * 32 * 2 * 2  # attention + embedding only

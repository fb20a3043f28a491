"""Closed-form communication volumes: the project's own pattern, and the seeds' formulas beside it.

Who calls it: the cost model (bytes per collective, to turn into seconds), the tests, and the mesh's
communication accounting (mesh/comm.py), whose counted bytes must equal `step_volumes` exactly (docs/planner.md
sets the forms out and explains every difference from the seeds').

What is counted ("payload"): the bytes of the tensors a rank hands to a collective, summed over the ranks of the
replica: an all-reduce counts its buffer once per participating rank, an all-gather each rank's input shard, a
send the tensor sent, an all-to-all the part of the send buffer addressed to other ranks. Payload does not depend
on the algorithm the library picks; what crosses the wire does, and `ring_allreduce_wire_bytes` /
`one_shot_allreduce_wire_bytes` convert.

The project's pattern (mesh/layers.py, mesh/decoder.py, mesh/moe.py, mesh/context_parallel.py,
mesh/ring_attention.py, mesh/round_robin_kv.py):
- TP: RowParallelLinear all-reduces [rows, h] after attention's o_proj and after the MLP's down_proj (2 per layer;
  1 when ep > 1, the MoE block then has no tp all-reduce); VocabParallelEmbedding all-reduces [rows, h] once per
  forward (2L + 1 in all); ParallelLMHead all-gathers [n, V / t] slices, only for the n returned rows (the last
  token of each sequence), not for all tokens.
- PP: one hidden state [rows, h] per stage boundary (the residual stream is the hidden state; no second tensor).
- CP (a sharded prefill step): pass-KV sends one [2, T_loc + C_max, H_kv_loc, D] block (K and V together) to the
  ring neighbour, N - 1 times per layer; pass-Q sends the Q block [T_loc, H_loc, D] N - 1 times per layer, then one
  all-to-all of partial outputs with the log-sum-exp as an extra column, [N, T_loc, H_loc, D + 1] in the compute
  dtype (float32 for 16-bit models), of which (N - 1) / N leaves the rank. The returned rows' hidden states are
  summed over the cp group ([n, h] all-reduce) so every cp rank computes the logits; with a persistent
  round-robin KV store each layer's new K/V rows go to their owners (position p on rank p % N) in one all-to-all.
- EP (ep = cp * tp): per layer an all-to-all of the routing counts (E int64 per rank), one of the (token, expert)
  rows out and one back (data-dependent: `step_volumes` gives the expectation under uniform routing), then an
  all-gather of each rank's padded chunk over the ranks holding the same rows.
T_loc = sum over sequences of 2 * ceil(L_s / 2N) (load-balanced chunks, padding included); C_max = sum over
sequences of ceil(C_s / N) (the cached prefix round-robin, rank 0 holding the most).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mesh.parallel import MeshShape

from orchestrator.planner.model_shape import ModelShape

# The kinds mesh/comm.py counts (kept equal by a test; defined here too so the planner imports without torch).
COMM_KINDS = ("tp_allreduce", "tp_allgather", "pp_send", "cp_ring", "cp_all_to_all", "cp_row_gather",
              "cp_kv_exchange", "ep_all_to_all", "ep_allgather")
_COUNT_BYTES = 8  # MoE routing counts travel as int64


# --- the seeds' formulas, as the issue quotes them (b read as bytes per element) ----------------------------------

def seed_tp_allreduce_bytes(*, num_layers: int, prompt_len: int, output_len: int, hidden_size: int,
                            dtype_bytes: int, tp: int) -> float:
    """(2L + 1)(Sp + Sd - 1) h b 2(t - 1)/t: ring all-reduce bytes one rank sends over a whole request."""
    return (2 * num_layers + 1) * (prompt_len + output_len - 1) * hidden_size * dtype_bytes * 2 * (tp - 1) / tp


def seed_pp_bytes(*, prompt_len: int, output_len: int, hidden_size: int, dtype_bytes: int, pp: int) -> float:
    """(p - 1)(Sp + Sd - 1) h b 2: stage hand-offs over a whole request (the 2: hidden state and residual)."""
    return (pp - 1) * (prompt_len + output_len - 1) * hidden_size * dtype_bytes * 2


def seed_cp_block_elements(*, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
    """T N_KV D_H: elements of one pass-KV ring block (one tensor, no dtype, no TP split)."""
    return num_tokens * num_kv_heads * head_dim


# --- helpers ------------------------------------------------------------------------------------------------------

def ring_allreduce_wire_bytes(payload_bytes: float, num_ranks: int) -> float:
    """Bytes one rank sends in a ring all-reduce (reduce-scatter + all-gather) of a `payload_bytes` buffer."""
    return payload_bytes * 2 * (num_ranks - 1) / num_ranks


def one_shot_allreduce_wire_bytes(payload_bytes: float, num_ranks: int) -> float:
    """Bytes one rank sends when it pushes its whole buffer to every peer (one-shot, small-message all-reduce)."""
    return payload_bytes * (num_ranks - 1)


def cp_local_tokens(query_lens: list[int], cp: int) -> int:
    """Rows of each CP rank's new-token shard: 2 chunks of ceil(L / 2N) per sequence."""
    return sum(2 * -(-n // (2 * cp)) for n in query_lens) if cp > 1 else sum(query_lens)


def cp_max_cached_local(context_lens: list[int], cp: int) -> int:
    """Cached rows of the CP rank holding the most (rank 0: positions 0, N, 2N, ...)."""
    return sum(-(-c // cp) for c in context_lens) if cp > 1 else sum(context_lens)


def kv_heads_per_rank(model: ModelShape, tp: int) -> int:
    """KV heads split over tp, or one replicated head per rank when tp exceeds them."""
    return model.num_kv_heads // min(tp, model.num_kv_heads)


def cp_real_rows(query_lens: list[int], cp: int, rank: int) -> int:
    """Real (non-padding) rows of CP rank `rank`'s shard: its two chunks of every sequence."""
    total = 0
    for length in query_lens:
        chunk = -(-length // (2 * cp))
        for index in (rank, 2 * cp - 1 - rank):
            total += max(0, min(chunk, length - index * chunk))
    return total


def _count_residue(start: int, stop: int, modulus: int, residue: int) -> int:
    """How many x in [start, stop) have x % modulus == residue."""
    return max(0, (stop - 1 - residue) // modulus - (start - 1 - residue) // modulus)


def cp_rows_sent_to_owners(query_lens: list[int], context_lens: list[int], cp: int) -> int:
    """New rows that leave their CP rank for their round-robin owner (position p lives on rank p % cp), summed over
    the ranks: the rows of the round-robin store's per-layer all-to-all."""
    total = 0
    for length, context in zip(query_lens, context_lens):
        chunk = -(-length // (2 * cp))
        for rank in range(cp):
            for index in (rank, 2 * cp - 1 - rank):
                start = index * chunk
                stop = min((index + 1) * chunk, length)
                if stop <= start:
                    continue
                real = stop - start
                total += real - _count_residue(context + start, context + stop, cp, rank)
    return total


@dataclass(frozen=True, kw_only=True)
class CommVolumes:
    """Payload bytes by kind, summed over the ranks of one replica (see the module docstring)."""

    tp_allreduce: float = 0.0
    tp_allgather: float = 0.0
    pp_send: float = 0.0
    cp_ring: float = 0.0
    cp_all_to_all: float = 0.0
    cp_row_gather: float = 0.0
    cp_kv_exchange: float = 0.0
    ep_all_to_all: float = 0.0  # expectation under uniform routing (the real figure depends on the router)
    ep_allgather: float = 0.0

    def __add__(self, other: CommVolumes) -> CommVolumes:
        return CommVolumes(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, factor: float) -> CommVolumes:
        return CommVolumes(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def total(self) -> float:
        return sum(self.as_dict().values())


@dataclass(frozen=True, kw_only=True)
class CollectiveCounts:
    """How many collectives one forward pass issues in one tp group, over all stages (docs/planner.md)."""

    num_allreduces: int  # 2 per layer (1 with EP) + 1 for the embedding
    allreduce_group_size: int
    num_allgathers: int  # the LM head's logits
    num_stage_handoffs: int  # pp - 1
    num_ring_steps_per_layer: int  # cp - 1 sends per CP rank per layer (sharded prefill steps)


def collectives_per_forward(model: ModelShape, mesh: MeshShape) -> CollectiveCounts:
    has_tp = mesh.tp > 1
    per_layer = 1 if mesh.ep > 1 else 2
    return CollectiveCounts(num_allreduces=(per_layer * model.num_layers + 1) if has_tp else 0,
                            allreduce_group_size=mesh.tp, num_allgathers=1 if has_tp else 0,
                            num_stage_handoffs=mesh.pp - 1, num_ring_steps_per_layer=mesh.cp - 1)


def step_volumes(model: ModelShape, mesh: MeshShape, *, query_lens: list[int], context_lens: list[int] | None = None,
                 cp_mode: str = "pass-kv", is_paged: bool = False, has_cp_store: bool = False) -> CommVolumes:
    """Payload of one forward step of a replica with mesh `mesh` over sequences with `query_lens` new tokens
    (`context_lens` already cached), returning the logits of each sequence's last token. With cp > 1, a step is
    CP-sharded unless `is_paged` (decode after a CP prefill: every cp rank computes every row); `has_cp_store`:
    the prefill keeps its KV in the round-robin store (partial prefill, the prefix cache), which shards the step
    even at cp == 1 (rows padded to two chunks of ceil(L / 2) per sequence)."""
    context_lens = list(context_lens or [0] * len(query_lens))
    if len(context_lens) != len(query_lens):
        raise ValueError("step_volumes: need one context_len per sequence")
    if cp_mode not in ("pass-kv", "pass-q"):
        raise ValueError(f"step_volumes: cp_mode must be pass-kv or pass-q, got {cp_mode!r}")
    e, h, L = model.dtype_bytes, model.hidden_size, model.num_layers
    tp, cp, pp, ep = mesh.tp, mesh.cp, mesh.pp, mesh.ep
    num_tokens, num_logits = sum(query_lens), len(query_lens)
    # A step through the round-robin store is CP-sharded even at cp == 1 (two padded chunks per sequence).
    is_sharded = (cp > 1 or has_cp_store) and not is_paged
    rows = sum(2 * -(-n // (2 * cp)) for n in query_lens) if is_sharded else num_tokens  # rows every rank computes
    num_ranks_per_stage = cp * tp
    volumes: dict[str, float] = {}
    if tp > 1:
        allreduces_per_layer = 1 if ep > 1 else 2
        volumes["tp_allreduce"] = (allreduces_per_layer * L + 1) * rows * h * e * num_ranks_per_stage
        # Every cp rank's tp group computes the logits of the returned rows; each rank brings V / t columns.
        volumes["tp_allgather"] = cp * num_logits * model.vocab_size * e
    volumes["pp_send"] = (pp - 1) * rows * h * e * num_ranks_per_stage
    if is_sharded and cp > 1:
        ring_ranks = L * num_ranks_per_stage  # every layer, every CP rank of every tp position
        if cp_mode == "pass-kv":
            block_rows = rows + cp_max_cached_local(context_lens, cp)
            volumes["cp_ring"] = ring_ranks * (cp - 1) * 2 * block_rows * kv_heads_per_rank(model, tp) \
                * model.head_dim * e
        else:
            heads_local = model.num_heads // tp
            volumes["cp_ring"] = ring_ranks * (cp - 1) * rows * heads_local * model.head_dim * e
            compute_bytes = max(e, 4)  # partials are merged in float32 (float64 for float64 models)
            volumes["cp_all_to_all"] = ring_ranks * (cp - 1) * rows * heads_local * (model.head_dim + 1) \
                * compute_bytes
        volumes["cp_row_gather"] = num_ranks_per_stage * num_logits * h * e
        if has_cp_store:
            volumes["cp_kv_exchange"] = L * tp * cp_rows_sent_to_owners(query_lens, context_lens, cp) * 2 \
                * kv_heads_per_rank(model, tp) * model.head_dim * e
    if ep > 1:
        remote = (ep - 1) / ep
        k = model.num_experts_per_token
        volumes["ep_all_to_all"] = L * (2 * num_tokens * k * h * e * remote
                                        + num_ranks_per_stage * model.num_experts * _COUNT_BYTES * remote)
        # Ranks holding the same rows each route a padded chunk of them and all-gather the results.
        if is_sharded:
            groups = [(tp, cp_real_rows(query_lens, cp, rank)) for rank in range(cp)]
        else:
            groups = [(num_ranks_per_stage if cp > 1 else tp, num_tokens)]
        volumes["ep_allgather"] = L * sum(size * -(-real // size) for size, real in groups if size > 1) * h * e
    return CommVolumes(**volumes)


def request_volumes(model: ModelShape, prefill_mesh: MeshShape, decode_mesh: MeshShape, *, prompt_len: int,
                    output_len: int, cp_mode: str = "pass-kv") -> dict[str, CommVolumes]:
    """One request alone: its prefill step (Sp tokens) on the prefill replica and its Sd - 1 decode steps (one
    token each) on the decode replica. Keys: "prefill", "decode"."""
    if prompt_len < 1 or output_len < 1:
        raise ValueError("request_volumes: prompt_len and output_len must be >= 1")
    prefill = step_volumes(model, prefill_mesh, query_lens=[prompt_len], cp_mode=cp_mode)
    decode = CommVolumes()
    if output_len > 1:
        one_step = step_volumes(model, decode_mesh, query_lens=[1], context_lens=[prompt_len], is_paged=True)
        decode = one_step.scaled(output_len - 1)
    return {"prefill": prefill, "decode": decode}


def kv_transfer_bytes(model: ModelShape, num_tokens: int) -> int:
    """K and V of `num_tokens` over every layer, each element once (what travels from prefill to decode)."""
    return model.kv_bytes_per_token * num_tokens

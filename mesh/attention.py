"""Attention over a packed step of several sequences, with or without the paged KV cache.

Who calls it: `mesh.model.Attention` once per layer. `AttentionBatch` is built by the tier engines (prefill and
decode) for each step; `StepPlan.build` turns it into index tensors once per forward, shared by all layers.

KV cache format (see docs/internals.md): one tensor per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`,
index 1 of dim 1 is K (0) or V (1); token p of a sequence lives in block `block_table[p // block_size]`, row
`p % block_size`. K is stored after rotary embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    """One step's sequences, packed in order. `query_lens[i]` new tokens of sequence i, `context_lens[i]` tokens it
    already has in the cache, `block_tables[i]` its cache blocks (None = no paged cache: plain prefill over the
    step's own tokens, or a context-parallel prefill), `logits_indices` the packed rows whose logits the model
    returns. `seq_keys[i]` names sequence i in a `RoundRobinKVStore` (CP prefill against a persistent cache; None
    otherwise). A non-zero context_len needs block_tables or seq_keys."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]] | None
    logits_indices: torch.Tensor
    seq_keys: list | None = None

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError(
                f"AttentionBatch: {len(self.query_lens)} query_lens but {len(self.context_lens)} context_lens"
            )
        if any(n < 1 for n in self.query_lens):
            raise ValueError(f"AttentionBatch.query_lens: every sequence needs >= 1 new token, got {self.query_lens}")
        if any(n < 0 for n in self.context_lens):
            raise ValueError(f"AttentionBatch.context_lens: must be >= 0, got {self.context_lens}")
        if self.seq_keys is not None and len(self.seq_keys) != len(self.query_lens):
            raise ValueError(f"AttentionBatch.seq_keys: {len(self.seq_keys)} keys for {len(self.query_lens)} sequences")
        if self.block_tables is None:
            if any(self.context_lens) and self.seq_keys is None:
                raise ValueError("AttentionBatch.context_lens: non-zero context needs block_tables (a paged KV "
                                 "cache) or seq_keys (a context-parallel RoundRobinKVStore)")
        elif len(self.block_tables) != len(self.query_lens):
            raise ValueError(
                f"AttentionBatch.block_tables: {len(self.block_tables)} tables for {len(self.query_lens)} sequences"
            )

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @staticmethod
    def last_token_indices(query_lens: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Packed row of each sequence's last token: the usual `logits_indices`."""
        return torch.tensor(query_lens, device=device).cumsum(0) - 1


@dataclass
class StepPlan:
    """Index tensors derived once per forward from an AttentionBatch and shared by every layer (so the per-layer
    attention does no host-to-device copies)."""

    batch: AttentionBatch
    starts: list[int]  # packed row where each sequence's new tokens begin
    slot_blocks: torch.Tensor | None = None  # [T] cache block of each new token (None without a cache)
    slot_rows: torch.Tensor | None = None  # [T] row inside that block
    # Sequences with cached context: their blocks [ceil((context + new) / block_size)] and causal mask
    # [new, context + new] (None for fresh sequences, which attend to the step's own rows).
    context_blocks: list[torch.Tensor | None] | None = None
    context_masks: list[torch.Tensor | None] | None = None
    # Pure decode (every sequence adds one token to a cache): padded block tables [B, max_blocks] and the key
    # mask [B, max_blocks * block_size]; the batched path runs one SDPA for the whole batch.
    decode_tables: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, batch: AttentionBatch, kv_cache: list[torch.Tensor] | None, device: torch.device) -> StepPlan:
        starts = [0]
        for n in batch.query_lens[:-1]:
            starts.append(starts[-1] + n)
        if batch.block_tables is None:
            return cls(batch, starts)
        if not kv_cache:
            raise ValueError("forward: batch.block_tables is set but kv_cache is None")
        num_blocks, _, block_size = kv_cache[0].shape[:3]
        tables: list[list[int]] = []
        for i, (table, context, new) in enumerate(zip(batch.block_tables, batch.context_lens, batch.query_lens)):
            needed = -(-(context + new) // block_size)
            if len(table) < needed:
                raise ValueError(
                    f"AttentionBatch.block_tables[{i}]: {len(table)} blocks hold {len(table) * block_size} tokens, "
                    f"sequence needs {context + new}"
                )
            if any(not 0 <= b < num_blocks for b in table[:needed]):
                raise ValueError(f"AttentionBatch.block_tables[{i}]: block id outside 0..{num_blocks - 1}")
            tables.append(list(table[:needed]))
        plan = cls(batch, starts)
        blocks, rows = [], []
        for table, context, new in zip(tables, batch.context_lens, batch.query_lens):
            token_positions = torch.arange(context, context + new)
            blocks.append(torch.tensor(table, dtype=torch.long)[token_positions // block_size])
            rows.append(token_positions % block_size)
        plan.slot_blocks = torch.cat(blocks).to(device)
        plan.slot_rows = torch.cat(rows).to(device)
        if all(n == 1 for n in batch.query_lens):
            max_blocks = max(len(table) for table in tables)
            # Pad short tables with block 0: those keys are masked out.
            padded = [table + [0] * (max_blocks - len(table)) for table in tables]
            plan.decode_tables = torch.tensor(padded, dtype=torch.long).to(device)
            lengths = torch.tensor(batch.context_lens) + 1
            plan.decode_mask = (torch.arange(max_blocks * block_size)[None, :] < lengths[:, None]).to(device)
            return plan
        plan.context_blocks, plan.context_masks = [], []
        for table, context, new in zip(tables, batch.context_lens, batch.query_lens):
            if context == 0:
                plan.context_blocks.append(None)
                plan.context_masks.append(None)
                continue
            # Query j of this step sits at position context + j and sees keys 0..context + j.
            mask = torch.arange(context + new)[None, :] <= torch.arange(context, context + new)[:, None]
            plan.context_blocks.append(torch.tensor(table, dtype=torch.long).to(device))
            plan.context_masks.append(mask.to(device))
        return plan


def write_kv(cache: torch.Tensor, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's K/V rows ([T, kv_heads, head_dim]) into their cache slots."""
    cache[plan.slot_blocks, 0, plan.slot_rows] = k.to(cache.dtype)
    cache[plan.slot_blocks, 1, plan.slot_rows] = v.to(cache.dtype)


def _repeat_kv(x: torch.Tensor, num_repeats: int, head_dim_axis: int) -> torch.Tensor:
    # Query head h reads KV head h // num_repeats (transformers' repeat_kv layout).
    return x if num_repeats == 1 else x.repeat_interleave(num_repeats, dim=head_dim_axis)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, cache: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """q: [T, heads, D]; k, v: [T, kv_heads, D] for the step's new tokens (already written to `cache` when there
    is one). Returns [T, heads, D]."""
    num_repeats = q.shape[1] // k.shape[1]
    if plan.decode_tables is not None:
        return _attend_decode(q, plan, cache, scale, num_repeats)
    outputs = []
    for i, (start, new) in enumerate(zip(plan.starts, plan.batch.query_lens)):
        q_seq = q[start:start + new].transpose(0, 1)  # [heads, new, D]
        blocks = plan.context_blocks[i] if plan.context_blocks is not None else None
        if blocks is None:
            # Fresh sequence: its keys are exactly the step's own rows (equal to what was cached).
            k_seq, v_seq = k[start:start + new], v[start:start + new]
            mask, is_causal = None, True
        else:
            length = plan.context_masks[i].shape[1]
            k_seq, v_seq = _gather_sequence(cache, blocks, length)
            k_seq, v_seq = k_seq.to(q.dtype), v_seq.to(q.dtype)
            mask, is_causal = plan.context_masks[i], False
        k_seq = _repeat_kv(k_seq, num_repeats, 1).transpose(0, 1)
        v_seq = _repeat_kv(v_seq, num_repeats, 1).transpose(0, 1)
        # 4-D inputs: the fused (flash / memory-efficient) SDPA kernels on GPU take only [batch, heads, len, dim].
        out = F.scaled_dot_product_attention(q_seq[None], k_seq[None], v_seq[None], attn_mask=mask,
                                             is_causal=is_causal, scale=scale)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _gather_sequence(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached K and V rows of one sequence: [length, kv_heads, D] each."""
    kv = cache[blocks]  # [num_blocks, 2, block_size, kv_heads, D]
    num_blocks, _, block_size, kv_heads, head_dim = kv.shape
    k = kv[:, 0].reshape(num_blocks * block_size, kv_heads, head_dim)[:length]
    v = kv[:, 1].reshape(num_blocks * block_size, kv_heads, head_dim)[:length]
    return k, v


def _attend_decode(q: torch.Tensor, plan: StepPlan, cache: torch.Tensor, scale: float,
                   num_repeats: int) -> torch.Tensor:
    """All sequences add one token: gather every sequence's blocks into one padded batch and run a single SDPA,
    masking the padding (the decode tier's hot loop)."""
    kv = cache[plan.decode_tables]  # [B, max_blocks, 2, block_size, kv_heads, D]
    num_seqs, max_blocks, _, block_size, kv_heads, head_dim = kv.shape
    max_len = max_blocks * block_size
    k = kv[:, :, 0].reshape(num_seqs, max_len, kv_heads, head_dim).to(q.dtype)
    v = kv[:, :, 1].reshape(num_seqs, max_len, kv_heads, head_dim).to(q.dtype)
    k = _repeat_kv(k, num_repeats, 2).transpose(1, 2)  # [B, heads, max_len, D]
    v = _repeat_kv(v, num_repeats, 2).transpose(1, 2)
    mask = plan.decode_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale)
    return out[:, :, 0, :]

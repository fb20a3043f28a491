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
    already has in the cache, `block_tables[i]` its cache blocks (None = no cache: plain prefill over the step's own
    tokens, and every context_len must be 0), `logits_indices` the packed rows whose logits the model returns."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]] | None
    logits_indices: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError(
                f"AttentionBatch: {len(self.query_lens)} query_lens but {len(self.context_lens)} context_lens"
            )
        if any(n < 1 for n in self.query_lens):
            raise ValueError(f"AttentionBatch.query_lens: every sequence needs >= 1 new token, got {self.query_lens}")
        if any(n < 0 for n in self.context_lens):
            raise ValueError(f"AttentionBatch.context_lens: must be >= 0, got {self.context_lens}")
        if self.block_tables is None:
            if any(self.context_lens):
                raise ValueError("AttentionBatch.context_lens: non-zero context needs block_tables (a KV cache)")
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
    """Index tensors derived once per forward from an AttentionBatch and shared by every layer."""

    batch: AttentionBatch
    starts: list[int]  # packed row where each sequence's new tokens begin
    slot_blocks: torch.Tensor | None  # [T] cache block of each new token (None without a cache)
    slot_rows: torch.Tensor | None  # [T] row inside that block
    block_size: int
    is_pure_decode: bool  # every sequence adds exactly one token to a cache: the batched path applies

    @classmethod
    def build(cls, batch: AttentionBatch, kv_cache: list[torch.Tensor] | None, device: torch.device) -> StepPlan:
        starts = [0]
        for n in batch.query_lens[:-1]:
            starts.append(starts[-1] + n)
        if batch.block_tables is None:
            return cls(batch, starts, None, None, 0, False)
        if not kv_cache:
            raise ValueError("forward: batch.block_tables is set but kv_cache is None")
        block_size = kv_cache[0].shape[2]
        num_blocks = kv_cache[0].shape[0]
        blocks, rows = [], []
        for i, (table, context, new) in enumerate(zip(batch.block_tables, batch.context_lens, batch.query_lens)):
            needed = -(-(context + new) // block_size)
            if len(table) < needed:
                raise ValueError(
                    f"AttentionBatch.block_tables[{i}]: {len(table)} blocks hold {len(table) * block_size} tokens, "
                    f"sequence needs {context + new}"
                )
            if any(not 0 <= b < num_blocks for b in table[:needed]):
                raise ValueError(f"AttentionBatch.block_tables[{i}]: block id outside 0..{num_blocks - 1}")
            token_positions = torch.arange(context, context + new)
            table_tensor = torch.tensor(table[:needed], dtype=torch.long)
            blocks.append(table_tensor[token_positions // block_size])
            rows.append(token_positions % block_size)
        is_pure_decode = all(n == 1 for n in batch.query_lens)
        return cls(batch, starts, torch.cat(blocks).to(device), torch.cat(rows).to(device), block_size,
                   is_pure_decode)


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
    if plan.slot_blocks is not None and plan.is_pure_decode:
        return _attend_decode(q, plan, cache, scale, num_repeats)
    batch = plan.batch
    outputs = []
    for i, (start, new, context) in enumerate(zip(plan.starts, batch.query_lens, batch.context_lens)):
        q_seq = q[start:start + new].transpose(0, 1)  # [heads, new, D]
        if context == 0:
            # Fresh sequence: its keys are exactly the step's own rows (equal to what was cached).
            k_seq, v_seq = k[start:start + new], v[start:start + new]
            mask, is_causal = None, True
        else:
            k_seq, v_seq = _gather_sequence(cache, batch.block_tables[i], context + new, plan.block_size)
            k_seq, v_seq = k_seq.to(q.dtype), v_seq.to(q.dtype)
            # Query j of this step sits at position context + j and sees keys 0..context + j.
            key_positions = torch.arange(context + new, device=q.device)
            query_positions = torch.arange(context, context + new, device=q.device)
            mask, is_causal = key_positions[None, :] <= query_positions[:, None], False
        k_seq = _repeat_kv(k_seq, num_repeats, 1).transpose(0, 1)
        v_seq = _repeat_kv(v_seq, num_repeats, 1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask, is_causal=is_causal, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _gather_sequence(cache: torch.Tensor, table: list[int], length: int,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached K and V rows of one sequence: [length, kv_heads, D] each."""
    num_blocks = -(-length // block_size)
    blocks = torch.tensor(table[:num_blocks], dtype=torch.long, device=cache.device)
    kv = cache[blocks]  # [num_blocks, 2, block_size, kv_heads, D]
    kv_heads, head_dim = kv.shape[-2:]
    k = kv[:, 0].reshape(num_blocks * block_size, kv_heads, head_dim)[:length]
    v = kv[:, 1].reshape(num_blocks * block_size, kv_heads, head_dim)[:length]
    return k, v


def _attend_decode(q: torch.Tensor, plan: StepPlan, cache: torch.Tensor, scale: float,
                   num_repeats: int) -> torch.Tensor:
    """All sequences add one token: gather every sequence's blocks into one padded batch and run a single SDPA,
    masking the padding (the decode tier's hot loop)."""
    batch = plan.batch
    lengths = [c + 1 for c in batch.context_lens]
    max_blocks = max(-(-n // plan.block_size) for n in lengths)
    # Pad short tables with block 0: those rows are masked out below.
    tables = [table[:max_blocks] + [0] * (max_blocks - len(table[:max_blocks])) for table in batch.block_tables]
    table_tensor = torch.tensor(tables, dtype=torch.long, device=cache.device)
    kv = cache[table_tensor]  # [B, max_blocks, 2, block_size, kv_heads, D]
    num_seqs, _, _, block_size, kv_heads, head_dim = kv.shape
    max_len = max_blocks * block_size
    k = kv[:, :, 0].reshape(num_seqs, max_len, kv_heads, head_dim).to(q.dtype)
    v = kv[:, :, 1].reshape(num_seqs, max_len, kv_heads, head_dim).to(q.dtype)
    k = _repeat_kv(k, num_repeats, 2).transpose(1, 2)  # [B, heads, max_len, D]
    v = _repeat_kv(v, num_repeats, 2).transpose(1, 2)
    length_tensor = torch.tensor(lengths, device=q.device)
    mask = torch.arange(max_len, device=q.device)[None, :] < length_tensor[:, None]  # [B, max_len]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0, :]

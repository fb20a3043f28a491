"""Tensor-parallel building blocks. Each takes its process group explicitly (None = this rank holds everything and
never communicates) and loads its own shard of a full checkpoint tensor with `load_full`.

`load_full(full, name="weight")` accepts a torch tensor or a safetensors slice (`safe_open(...).get_slice(name)`);
both support `shape`/`get_shape()` and basic slicing, so a rank reads only the rows or columns it keeps.

Who calls it: `mesh.model` builds the transformer from these and `CausalLM.load` feeds them checkpoint tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mesh import comm


def full_shape(full: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a safetensors slice (which has get_shape() instead of .shape)."""
    if isinstance(full, torch.Tensor):
        return tuple(full.shape)
    return tuple(full.get_shape())


def group_rank_size(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def copy_into(param: torch.Tensor, shard: torch.Tensor, what: str) -> None:
    if tuple(shard.shape) != tuple(param.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(shard.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(shard)  # copy_ casts dtype and moves device


def empty_param(*shape: int, dtype: torch.dtype, device: Any) -> nn.Parameter:
    # Loading overwrites every element; requires_grad off because this is an inference engine.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def check_full(name: str, full: Any, expected: tuple[int, ...], layer: str) -> None:
    shape = full_shape(full)
    if shape != expected:
        raise ValueError(f"{layer}.{name}: full checkpoint tensor has shape {shape}, expected {expected}")


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split over the group; each rank returns its slice of y, no
    communication. `num_shards`/`shard_index` override the split for replicated weights (KV heads when tp is larger
    than the number of KV heads: several ranks hold the same shard)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: Any = None,
                 num_shards: int | None = None, shard_index: int | None = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        super().__init__()
        group_rank, group_size = group_rank_size(group)
        self.num_shards = group_size if num_shards is None else num_shards
        self.shard_index = group_rank if shard_index is None else shard_index
        if out_features % self.num_shards != 0:
            raise ValueError(f"ColumnParallelLinear: {self.num_shards} shards do not divide {out_features} outputs")
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_local = out_features // self.num_shards
        self.weight = empty_param(self.out_features_local, in_features, dtype=dtype, device=device)
        self.bias = empty_param(self.out_features_local, dtype=dtype, device=device) if bias else None

    def load_full(self, full: Any, name: str = "weight") -> None:
        start = self.shard_index * self.out_features_local
        stop = start + self.out_features_local
        if name == "weight":
            check_full(name, full, (self.out_features, self.in_features), type(self).__name__)
            copy_into(self.weight, full[start:stop], "weight")
        elif name == "bias" and self.bias is not None:
            check_full(name, full, (self.out_features,), type(self).__name__)
            copy_into(self.bias, full[start:stop], "bias")
        else:
            raise ValueError(f"ColumnParallelLinear has no parameter {name!r} to load")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's input columns split over the group: each rank multiplies its slice of x (the output
    of a column-parallel layer) and the partial sums are all-reduced over the group. The bias is added once, after
    the reduction."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: Any = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group_rank_size(group)
        if in_features % self.tp_size != 0:
            raise ValueError(f"RowParallelLinear: tp={self.tp_size} does not divide {in_features} inputs")
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_local = in_features // self.tp_size
        self.weight = empty_param(out_features, self.in_features_local, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None

    def load_full(self, full: Any, name: str = "weight") -> None:
        if name == "weight":
            check_full(name, full, (self.out_features, self.in_features), type(self).__name__)
            start = self.tp_rank * self.in_features_local
            copy_into(self.weight, full[:, start:start + self.in_features_local], "weight")
        elif name == "bias" and self.bias is not None:
            check_full(name, full, (self.out_features,), type(self).__name__)
            copy_into(self.bias, full[:], "bias")
        else:
            raise ValueError(f"RowParallelLinear has no parameter {name!r} to load")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.group is not None:
            comm.all_reduce(y, group=self.group, kind="tp_allreduce")
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: each rank looks up the ids it owns, zeros the others, and the
    group all-reduces so every rank ends with the full embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int, *, group: Any = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group_rank_size(group)
        if vocab_size % self.tp_size != 0:
            raise ValueError(f"VocabParallelEmbedding: tp={self.tp_size} does not divide vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_size_local = vocab_size // self.tp_size
        self.vocab_start = self.tp_rank * self.vocab_size_local
        self.weight = empty_param(self.vocab_size_local, hidden_size, dtype=dtype, device=device)

    def load_full(self, full: Any, name: str = "weight") -> None:
        if name != "weight":
            raise ValueError(f"VocabParallelEmbedding has no parameter {name!r} to load")
        check_full(name, full, (self.vocab_size, self.hidden_size), type(self).__name__)
        copy_into(self.weight, full[self.vocab_start:self.vocab_start + self.vocab_size_local], "weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        is_mine = (local_ids >= 0) & (local_ids < self.vocab_size_local)
        embeddings = F.embedding(torch.where(is_mine, local_ids, 0), self.weight)
        embeddings = embeddings * is_mine.unsqueeze(-1).to(embeddings.dtype)
        comm.all_reduce(embeddings, group=self.group, kind="tp_allreduce")
        return embeddings


class ParallelLMHead(nn.Module):
    """Output projection split by vocabulary rows (same split as VocabParallelEmbedding, so tied weights share
    one shard); the group all-gathers the logit slices so every rank returns the full vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, *, group: Any = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group_rank_size(group)
        if vocab_size % self.tp_size != 0:
            raise ValueError(f"ParallelLMHead: tp={self.tp_size} does not divide vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_size_local = vocab_size // self.tp_size
        self.vocab_start = self.tp_rank * self.vocab_size_local
        self.weight = empty_param(self.vocab_size_local, hidden_size, dtype=dtype, device=device)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's shard (tie_word_embeddings): same rows, same rank split."""
        if (embedding.vocab_size_local, embedding.vocab_start) != (self.vocab_size_local, self.vocab_start):
            raise ValueError("ParallelLMHead.tie_to: embedding is split differently")
        self.weight = embedding.weight

    def load_full(self, full: Any, name: str = "weight") -> None:
        if name != "weight":
            raise ValueError(f"ParallelLMHead has no parameter {name!r} to load")
        check_full(name, full, (self.vocab_size, self.hidden_size), type(self).__name__)
        copy_into(self.weight, full[self.vocab_start:self.vocab_start + self.vocab_size_local], "weight")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.group is None:
            return logits
        slices = [torch.empty_like(logits) for _ in range(self.tp_size)]
        comm.all_gather(slices, logits.contiguous(), group=self.group, kind="tp_allgather")
        return torch.cat(slices, dim=-1)


class RMSNorm(nn.Module):
    """Replicated on every rank. Numerics follow transformers: normalise in float32, cast back to the input dtype,
    then scale by the weight."""

    def __init__(self, hidden_size: int, *, eps: float, dtype: torch.dtype = torch.float32,
                 device: Any = "cpu") -> None:
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = empty_param(hidden_size, dtype=dtype, device=device)

    def load_full(self, full: Any, name: str = "weight") -> None:
        if name != "weight":
            raise ValueError(f"RMSNorm has no parameter {name!r} to load")
        check_full(name, full, (self.hidden_size,), type(self).__name__)
        copy_into(self.weight, full[:], "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


def rope_inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies; `rope_scaling` None or the llama3 dict from ModelConfig."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if rope_scaling is None:
        return inv_freq
    return _llama3_scaled(inv_freq, rope_scaling)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling: wavelengths longer than the original context / low_freq_factor
    are stretched by `factor`, wavelengths shorter than original context / high_freq_factor are kept, and the band
    between is a linear blend of the two in (original context / wavelength)."""
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * torch.pi / inv_freq
    is_long = wavelength > original_context / low
    is_short = wavelength < original_context / high
    blend = (original_context / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(is_long, inv_freq / factor, blended)
    return torch.where(is_short, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE with the rotate-half convention of transformers (the two halves of a head are the (x, y) pairs).
    Positions come per token, so packed sequences and cached decode steps need no special casing."""

    def __init__(self, head_dim: int, *, rope_theta: float, rope_scaling: dict | None, device: Any = "cpu") -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inverse_frequencies(head_dim, rope_theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] in `dtype`, computed in float32 as transformers does."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq.to(torch.float32)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, num_heads, head_dim]; cos, sin: [T, head_dim]."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

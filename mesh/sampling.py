"""Next-token selection from logits, per request.

Who calls it: the prefill tier (first token) and the decode engine (every step), with the float32 logits of
`CausalLM.forward`. It promises: temperature 0 is argmax; otherwise temperature, then top-k, then top-p (the
smallest set of most likely tokens whose mass reaches top_p) and a draw. A seeded request's draw depends only on
its own logits and (seed, output_index), never on which other requests share the batch nor on the device, so any
replica (prefill for the first token, decode later, a retry elsewhere, another GPU type) reproduces the same stream.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

# Spreads (seed, output_index) over the generator's seed space; a prime so nearby seeds do not collide.
_SEED_STRIDE = 1_000_003
_SEED_MODULUS = 2 ** 63


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Tokens of this request already produced elsewhere (a retry after a replica failed re-prefills them as
    # prompt): seeded draws continue the same stream, so the client sees what it would have without the failure.
    output_offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stop = self.stop_token_ids
        if not isinstance(stop, (tuple, list)) or not all(isinstance(t, int) and t >= 0 for t in stop):
            raise ValueError(f"stop_token_ids must be a tuple of token ids >= 0, got {stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stop))  # accept a list, store a hashable tuple
        if not isinstance(self.output_offset, int) or isinstance(self.output_offset, bool) or self.output_offset < 0:
            raise ValueError(f"output_offset must be an integer >= 0, got {self.output_offset!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> torch.Tensor:
    """logits: [B, V]; `output_index[i]`: tokens request i produced before this one. Returns LongTensor[B]."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if not len(params) == len(output_index) == logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} logit rows, {len(params)} params, "
                         f"{len(output_index)} output indices; they must match")
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled_rows:
        return tokens
    row_index = torch.tensor(sampled_rows, device=logits.device)
    rows = logits[row_index]
    probs = _filtered_probs(rows, [params[i] for i in sampled_rows])
    noise = _exponential_noise(rows.shape, [params[i] for i in sampled_rows],
                               [output_index[i] + params[i].output_offset for i in sampled_rows], logits.device)
    # Exponential race: argmax(p / E) with E ~ Exp(1) picks token t with probability p_t, and each row's draw
    # uses only that row's noise, so batch composition never changes it.
    tokens[row_index] = (probs / noise).argmax(dim=-1)
    return tokens


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p applied row-wise; returns probabilities with filtered tokens at 0."""
    device = logits.device
    # Below 1e-5 the distribution is a point mass anyway; the floor keeps logits / temperature finite.
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
    logits = logits / temperature[:, None]
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab_size, device=device)[None, :]
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass of the tokens before it is still short of top_p (the first is always kept).
    # In float64: a float32 running sum over a 100K-token vocabulary drifts enough to move the cut, and the cut
    # must land on the same token on every device for seeded streams to agree.
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float64)
    sorted_probs64 = sorted_probs.double()
    mass_before = sorted_probs64.cumsum(dim=-1) - sorted_probs64
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)


def request_seed(seed: int, output_index: int) -> int:
    """The 63-bit key of one draw of a seeded request."""
    return (seed * _SEED_STRIDE + output_index) % _SEED_MODULUS


_MASK32 = 0xFFFFFFFF


def _mul32(x, constant: int):
    """(x * constant) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves so int64 never overflows. Works on
    Python ints and int64 tensors alike, with the same result on every device."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A 32-bit integer finaliser (xor-shift / multiply rounds): a bijection that scatters nearby inputs."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(key):
    """Two well-mixed 32-bit keys from a 63-bit draw key (int or int64 tensor)."""
    low, high = key & _MASK32, (key >> 32) & _MASK32
    first = _mix32(low ^ _mix32(high ^ 0x9E3779B9))
    return first, _mix32((first + 0x85EBCA6B) & _MASK32)


def _exponential_noise(shape: torch.Size, params: list[SamplingParams], output_index: list[int],
                       device: torch.device) -> torch.Tensor:
    """Exp(1) noise per (row, token) from a counter-based hash of (draw key, token id). Integer arithmetic is exact
    everywhere, so a seeded draw is the same on any replica and any device (a torch.Generator's stream depends on
    the device type and even on the GPU's kernel launch shape); requests without a seed get a fresh random key."""
    keys = [request_seed(p.seed, i) if p.seed is not None else secrets.randbits(63)
            for p, i in zip(params, output_index)]
    first_key, second_key = _row_keys(torch.tensor(keys, dtype=torch.int64, device=device)[:, None])
    token_ids = torch.arange(shape[1], dtype=torch.int64, device=device)[None, :]
    bits = _mix32(_mix32(token_ids ^ first_key) ^ second_key)
    return -torch.log(uniform_from_bits(bits))  # the inverse CDF of Exp(1)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) -> float32 uniform strictly inside (0, 1). Uses the top 23 bits: k + 0.5
    is exact in float32 for k < 2**23, so u never rounds to 1 (which would make the exponential noise 0)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * 2.0 ** -23

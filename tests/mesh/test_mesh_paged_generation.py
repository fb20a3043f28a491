"""Greedy generation through the paged KV cache, batched like the decode tier does it, against transformers'
`generate(do_sample=False)` run one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM

NUM_NEW_TOKENS = 24


def _shuffled_block_tables(lengths: list[int], block_size: int, seed: int) -> tuple[int, list[list[int]]]:
    """Non-contiguous, interleaved block ids for each sequence, with a few blocks left unused."""
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(order[start:start + n])
        start += n
    return num_blocks, tables


class GreedyBatcher:
    """A minimal continuous-batching loop: sequences join with a (mixed) prefill step, then all decode together."""

    def __init__(self, model: CausalLM, prompts: list[torch.Tensor], block_size: int, seed: int) -> None:
        self.model = model
        self.prompts = prompts
        total_lengths = [len(p) + NUM_NEW_TOKENS for p in prompts]
        num_blocks, self.tables = _shuffled_block_tables(total_lengths, block_size, seed)
        self.cache = allocate_kv_cache(model, num_blocks, block_size)
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.context: list[int] = [0] * len(prompts)

    def step(self, seqs: list[int], new_prompts: set[int]) -> None:
        """One forward over `seqs`: the ones in `new_prompts` prefill their whole prompt, the others decode."""
        ids, positions, query_lens = [], [], []
        for s in seqs:
            new = self.prompts[s] if s in new_prompts else torch.tensor([self.outputs[s][-1]])
            ids.append(new)
            positions.append(torch.arange(self.context[s], self.context[s] + len(new)))
            query_lens.append(len(new))
        batch = AttentionBatch(query_lens, [self.context[s] for s in seqs], [self.tables[s] for s in seqs],
                               AttentionBatch.last_token_indices(query_lens))
        logits = self.model(torch.cat(ids), torch.cat(positions), batch, self.cache)
        for row, s in enumerate(seqs):
            self.context[s] += query_lens[row]
            self.outputs[s].append(int(logits[row].argmax()))


def _reference_generate(reference, prompt: torch.Tensor) -> list[int]:
    reference.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():
        out = reference.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("variant", "block_size"), [("tiny-llama", 4), ("tiny-qwen2", 8), ("tiny-mistral", 4),
                                                      ("tiny-llama3-rope", 8), ("tiny-mixtral", 4)])
def test_batched_paged_greedy_matches_transformers_generate(variant, block_size, model_dir, hf_model):
    model = CausalLM.load(model_dir(variant))
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=generator) for n in (6, 17, 3)]
    batcher = GreedyBatcher(model, prompts, block_size, seed=11)
    # Sequences 0 and 1 prefill together; sequence 2 joins two steps later in a step mixed with their decodes;
    # afterwards every step is a pure decode of all running sequences.
    batcher.step([0, 1], new_prompts={0, 1})
    batcher.step([0, 1], new_prompts=set())
    batcher.step([0, 1, 2], new_prompts={2})
    while any(len(out) < NUM_NEW_TOKENS for out in batcher.outputs):
        batcher.step([s for s, out in enumerate(batcher.outputs) if len(out) < NUM_NEW_TOKENS], new_prompts=set())
    reference = hf_model(variant)
    for prompt, ours in zip(prompts, batcher.outputs):
        assert ours == _reference_generate(reference, prompt)
    assert len({tuple(out) for out in batcher.outputs}) == 3  # the prompts really led to different streams


def test_layer_hook_sees_exactly_what_lands_in_the_cache(model_dir):
    model = CausalLM.load(model_dir("tiny-qwen2"))
    block_size = 4
    cache = allocate_kv_cache(model, 8, block_size)
    tables = [[5, 1, 6], [3, 0]]
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def hook(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        seen.append((layer, k.clone(), v.clone()))

    def cached_rows(layer: int, table: list[int], positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.tensor([table[p // block_size] for p in positions])
        rows = torch.tensor([p % block_size for p in positions])
        return cache[layer][blocks, 0, rows], cache[layer][blocks, 1, rows]

    # Prefill of 7 + 5 tokens, then one decode step of both.
    prefill = AttentionBatch([7, 5], [0, 0], tables, AttentionBatch.last_token_indices([7, 5]))
    model(torch.arange(12) * 3, torch.cat([torch.arange(7), torch.arange(5)]), prefill, cache, layer_hook=hook)
    assert [layer for layer, _, _ in seen] == [0, 1, 2, 3]
    for layer, k, v in seen:
        assert k.shape == v.shape == (12, model.num_kv_heads_local, model.head_dim)
        k0, v0 = cached_rows(layer, tables[0], range(7))
        k1, v1 = cached_rows(layer, tables[1], range(5))
        assert torch.equal(k, torch.cat([k0, k1])) and torch.equal(v, torch.cat([v0, v1]))
    seen.clear()
    decode = AttentionBatch([1, 1], [7, 5], tables, torch.arange(2))
    model(torch.tensor([9, 10]), torch.tensor([7, 5]), decode, cache, layer_hook=hook)
    for layer, k, v in seen:
        k0, v0 = cached_rows(layer, tables[0], range(7, 8))
        k1, v1 = cached_rows(layer, tables[1], range(5, 6))
        assert torch.equal(k, torch.cat([k0, k1])) and torch.equal(v, torch.cat([v0, v1]))
    # K is stored post-rotary: position 0 is unrotated, so its K differs from any later position's.
    assert not torch.equal(seen[0][1][0], seen[0][1][1])


def test_unused_blocks_stay_untouched(model_dir):
    model = CausalLM.load(model_dir("tiny-llama"))
    cache = allocate_kv_cache(model, 6, 4)
    batch = AttentionBatch([6], [0], [[4, 1]], torch.tensor([5]))
    model(torch.arange(6), torch.arange(6), batch, cache)
    for layer_cache in cache:
        assert layer_cache[[0, 2, 3, 5]].abs().sum() == 0
        assert layer_cache[4].abs().sum() > 0 and layer_cache[1, :, :2].abs().sum() > 0
        assert layer_cache[1, :, 2:].abs().sum() == 0  # rows past the sequence's end

"""The decoder-only transformer (Llama / Mistral / Qwen2 / Mixtral) on one rank of a replica's mesh.

Who calls it: the prefill and decode tier rank actors, every rank of the replica at the same time, once per step:
`logits = model(input_ids, positions, batch, kv_cache, layer_hook)` (or `mesh.pipeline.run_pipeline` with several
micro-batches). Every rank passes the same step inputs (the whole packed batch: rank 0 broadcasts the plan); the
model takes its own share. It promises the same numbers as transformers' own classes on the same checkpoint
(float32: within 1e-4 relative), and that with a paged cache every new token's K/V is written to its slot before
attention reads it.

What each rank holds and returns (mesh degrees pp, cp, tp, ep; docs/internals.md has the full contract):
- Layers `model.layer_range` (global indices) of its pipeline stage; the embedding on the first stage, the final
  norm and LM head on the last. `kv_cache[i]` and a store's layer i are the stage's i-th layer.
- The ranks of the last stage return float32 logits [len(batch.logits_indices), vocab] (the same on all of them:
  TP all-gathers the vocabulary, CP gathers the requested rows); other stages return None
  (`mesh.pipeline.broadcast_logits` hands them to every rank).
- `layer_hook(layer_index, k, v)` gets global layer indices; on a cp-sharded step it gets a 4th argument, the
  `CPHookRows` of the rank's shard (mesh.decoder explains the three step kinds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mesh.attention import AttentionBatch, StepPlan
from mesh.config import ModelConfig
from mesh.context_parallel import CPRates, CPStep
from mesh.decoder import DecoderLayer, ForwardStep, LayerHook
from mesh.layers import ParallelLMHead, RMSNorm, RotaryEmbedding, VocabParallelEmbedding
from mesh.parallel import ParallelDims, stage_layer_range
from mesh.round_robin_kv import RoundRobinKVStore

__all__ = ["AttentionBatch", "CausalLM", "CheckpointError", "LayerHook"]


class CheckpointError(ValueError):
    """The safetensors files do not match config.json (missing, unexpected or misshapen tensors)."""


class CausalLM(nn.Module):
    """Parameters are allocated empty: build with `CausalLM.load`, or call `load_weights` yourself.
    `cp_rates` feeds the `cp_mode="auto"` choice between pass-KV and pass-Q (mesh.context_parallel.CPRates)."""

    def __init__(self, config: ModelConfig, dims: ParallelDims | None = None, *, dtype: torch.dtype = torch.float32,
                 device: Any = "cpu", cp_rates: CPRates | None = None) -> None:
        super().__init__()
        dims = ParallelDims.single() if dims is None else dims
        dims.shape.validate(config)
        self.config = config
        self.dims = dims
        self.dtype = dtype
        self.device = torch.device(device)
        self.cp_rates = cp_rates or CPRates()
        self.layer_range = stage_layer_range(config.num_layers, dims.pp_size, dims.pp_rank)
        common = dict(dtype=dtype, device=device)
        group = dims.tp_group
        self.embed_tokens = None
        if dims.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group=group, **common)
        self.layers = nn.ModuleList(DecoderLayer(config, dims, i, dtype, device) for i in self.layer_range)
        self.norm = self.lm_head = None
        if dims.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **common)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group=group, **common)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.tie_to(self.embed_tokens)
        self.rotary = RotaryEmbedding(config.head_dim, rope_theta=config.rope_theta,
                                      rope_scaling=config.rope_scaling, device=device)

    @property
    def num_kv_heads_local(self) -> int:
        return self.layers[0].self_attn.num_kv_heads_local

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def num_layers(self) -> int:
        """Layers this rank holds (its pipeline stage's): the length of its kv_cache list."""
        return len(self.layers)

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, dims: ParallelDims | None = None, dtype: torch.dtype = torch.float32,
             device: Any = "cpu", *, cp_rates: CPRates | None = None) -> CausalLM:
        """Reads config.json and every *.safetensors in `path`; each rank copies only its own slices (its stage's
        layers, its tp shards, its experts)."""
        config = ModelConfig.from_dir(path)
        model = cls(config, dims, dtype=dtype, device=device, cp_rates=cp_rates)
        model.load_weights(path)
        return model.eval()

    def _parameter_targets(self) -> dict[str, tuple[nn.Module, str]]:
        """Hugging Face tensor name -> (layer that loads it, parameter name), for what this rank holds."""
        targets: dict[str, tuple[nn.Module, str]] = {}
        if self.embed_tokens is not None:
            targets["model.embed_tokens.weight"] = (self.embed_tokens, "weight")
        if self.lm_head is not None:
            targets["model.norm.weight"] = (self.norm, "weight")
            if not self.config.tie_word_embeddings:
                targets["lm_head.weight"] = (self.lm_head, "weight")
            elif self.embed_tokens is None:  # tied head on a last stage without the embedding: load its copy
                targets["model.embed_tokens.weight"] = (self.lm_head, "weight")
        for layer in self.layers:
            targets.update(layer.checkpoint_targets())
        return targets

    def load_weights(self, path: str | Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in model directory {str(path)!r}")
        targets = self._parameter_targets()
        held_elsewhere = checkpoint_names(self.config) - set(targets)  # other stages' layers, other experts
        loaded: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in targets:
                        module, param = targets[name]
                        try:
                            module.load_full(f.get_slice(name), param)
                        except ValueError as error:
                            raise CheckpointError(f"{file.name}: tensor {name}: {error}") from None
                        loaded.add(name)
                    elif name in held_elsewhere or name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                        continue  # another rank's share, a tied head's copy, or a derived buffer of older exports
                    else:
                        raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {self.config.architecture}")
        missing = sorted(set(targets) - loaded)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint in {str(path)!r} is missing tensors {missing[:5]}{more}")

    # ---- one step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: list[torch.Tensor] | None = None, layer_hook: LayerHook | None = None, *,
                cp_mode: str = "auto", cp_store: RoundRobinKVStore | None = None) -> torch.Tensor | None:
        """input_ids, positions: [T] packed (the whole step, on every rank); returns float32 logits
        [len(batch.logits_indices), vocab_size] on the last pipeline stage, None on the others.

        kv_cache: the paged cache of this rank's layers (used when batch.block_tables is set). cp_mode ("auto",
        "pass-kv", "pass-q") and cp_store (this rank's RoundRobinKVStore, with batch.seq_keys) apply to cp-sharded
        steps: cp > 1 and no block_tables (or a cp_store on a cp == 1 mesh)."""
        from mesh.pipeline import MicroBatch, run_pipeline  # pipeline drives the model: import here, no cycle

        micro_batch = MicroBatch(input_ids, positions, batch, layer_hook)
        return run_pipeline(self, [micro_batch], kv_cache, cp_mode=cp_mode, cp_store=cp_store)[0]

    def prepare_step(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                     kv_cache: list[torch.Tensor] | None, layer_hook: LayerHook | None, *, cp_mode: str = "auto",
                     cp_store: RoundRobinKVStore | None = None) -> ForwardStep:
        """Validates one (micro-)batch and derives what every layer of this rank shares. No communication."""
        if input_ids.shape != positions.shape or input_ids.dim() != 1:
            raise ValueError(f"forward: input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                             "must both be 1-D of the same length")
        if input_ids.shape[0] != batch.num_tokens:
            raise ValueError(f"forward: {input_ids.shape[0]} tokens but batch.query_lens sums to {batch.num_tokens}")
        is_paged = batch.block_tables is not None
        if is_paged and kv_cache is not None and len(kv_cache) != self.num_layers:
            raise ValueError(f"forward: kv_cache has {len(kv_cache)} layers, this rank holds {self.num_layers} "
                             f"(layers {self.layer_range.start}..{self.layer_range.stop - 1})")
        dims = self.dims
        is_sharded = not is_paged and (dims.cp_size > 1 or cp_store is not None)
        if not is_sharded and cp_store is not None:
            raise ValueError("forward: cp_store is for context-parallel prefill steps; a step with block_tables "
                             "uses the paged kv_cache instead")
        if any(batch.context_lens) and not is_paged and cp_store is None:
            raise ValueError("forward: context_lens > 0 needs a cache: block_tables (paged) or a cp_store")
        cp = store = None
        if is_sharded:
            attn = self.layers[0].self_attn
            cp = CPStep.build(input_ids, batch.query_lens, batch.context_lens, cp_size=dims.cp_size,
                              cp_rank=dims.cp_rank, group=dims.cp_group, cp_mode=cp_mode,
                              heads=(attn.num_heads_local, attn.num_kv_heads_local, self.head_dim),
                              dtype_bytes=torch.empty((), dtype=self.dtype).element_size(), rates=self.cp_rates)
            if cp_store is not None:
                if batch.seq_keys is None:
                    raise ValueError("forward: a cp_store step needs batch.seq_keys (one key per sequence)")
                store = cp_store.begin_step(cp.plan, batch.seq_keys, dims.cp_group)
            step_ids, step_positions, paged = cp.input_ids, cp.positions, None
            replica_group = dims.tp_group  # the tp ranks of a cp shard hold the same rows
        else:
            paged = StepPlan.build(batch, kv_cache if is_paged else None, input_ids.device)
            step_ids, step_positions = input_ids, positions
            replica_group = dims.ep_group if dims.cp_size > 1 else dims.tp_group  # cp-replicated: whole stage
        cos, sin = self.rotary.cos_sin(step_positions, self.dtype)
        return ForwardStep(batch=batch, input_ids=step_ids, cos=cos, sin=sin, paged=paged,
                           kv_cache=kv_cache if is_paged else None, cp=cp, store=store, layer_hook=layer_hook,
                           moe_replica_group=replica_group)

    def embed(self, step: ForwardStep) -> torch.Tensor:
        """First stage: the step's hidden states [step.num_rows, hidden]."""
        return self.embed_tokens(step.input_ids)

    def run_layers(self, h: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        """This stage's layers; on a cp_store step, commits the step's new K/V to the store at the end."""
        for local_layer, layer in enumerate(self.layers):
            h = layer(h, step, local_layer)
        if step.store is not None:
            step.store.commit()
        return h

    def compute_logits(self, h: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        """Last stage: float32 logits of the rows in batch.logits_indices (collective over tp, and cp if sharded)."""
        rows = step.batch.logits_indices.to(h.device)
        selected = step.cp.gather_rows(h, rows) if step.cp is not None else h[rows]
        # Normalising only the returned rows gives the same numbers (RMSNorm is per row) for less work.
        return self.lm_head(self.norm(selected)).float()


def checkpoint_names(config: ModelConfig) -> set[str]:
    """Every tensor name of the whole model's Hugging Face checkpoint (all stages, all experts)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{prefix}self_attn.{proj}.weight")
            if config.qkv_bias and proj != "o_proj":
                names.add(f"{prefix}self_attn.{proj}.bias")
        if config.is_moe:
            names.add(f"{prefix}block_sparse_moe.gate.weight")
            names.update(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"
                         for e in range(config.num_experts) for w in ("w1", "w2", "w3"))
        else:
            names.update(f"{prefix}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj"))
        names.add(f"{prefix}input_layernorm.weight")
        names.add(f"{prefix}post_attention_layernorm.weight")
    return names

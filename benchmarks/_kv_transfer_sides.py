"""The two processes of benchmarks/kv_transfer.py: the decode side (KV server, paged cache on its GPU) and the
prefill side (KV clients, the model on its GPU), each driven over a pipe by the benchmark.

Protocol: the benchmark sends `(method, kwargs)`; the side runs `method(**kwargs)` and answers `("ok", result)` or
`("error", message)`. Transports live on an asyncio loop in a thread of each process (as in a Ray async actor);
the model runs on the process's main thread and hands each layer's KV to that loop, as the prefill tier does.
Times are `time.monotonic()`, which is one clock for every process of a machine (Linux CLOCK_MONOTONIC).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from typing import Any

import torch

TOKEN = "kv-transfer-benchmark"


def run_side(connection, role: str, device: str) -> None:
    """Process entry point: serve commands until ("stop", {})."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # both processes on one machine: control traffic on loopback
    side = (DecodeSide if role == "decode" else PrefillSide)(torch.device(device))
    while True:
        method, kwargs = connection.recv()
        if method == "stop":
            side.close()
            connection.send(("ok", None))
            return
        try:
            connection.send(("ok", getattr(side, method)(**kwargs)))
        except Exception as error:  # reported to the benchmark, which records it and goes on
            connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"))


class _Side:
    """An event loop in a thread (bound to this side's device) plus helpers."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="kv-loop", daemon=True)
        self._thread.start()
        ready.wait()

    def _run_loop(self, ready: threading.Event) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread: packing kernels run on this device's streams
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def on_loop(self, coroutine, timeout_s: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def kv_checksums(cache: list[torch.Tensor], block_ids: list[int]) -> list[int]:
    """Per layer, a position-weighted sum of the blocks' 16-bit words in block-table order: equal on both sides
    only if every block landed, whole and in its place."""
    index = torch.as_tensor(block_ids, dtype=torch.long, device=cache[0].device)
    sums = []
    for layer in cache:
        words = layer.index_select(0, index).reshape(-1).view(torch.int16).to(torch.int64)
        weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 65521 + 1
        sums.append(int((words * weights).sum().item()))
    return sums


class DecodeSide(_Side):
    def __init__(self, device: torch.device):
        super().__init__(device)
        self.cache: list[torch.Tensor] = []
        self.block_size = 16
        self.servers: dict[str, Any] = {}
        self.receivers: dict[str, Any] = {}

    def copy_ceiling(self, num_bytes: int, source_device: str, num_reps: int = 10) -> float:
        """GB/s of one large copy from `source_device` into this side's device (the link's ceiling)."""
        source = torch.empty(num_bytes, dtype=torch.uint8, device=source_device).random_(0, 255)
        target = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        times = []
        for _ in range(num_reps + 2):
            self.synchronize()
            if source.is_cuda:
                torch.cuda.synchronize(source.device)
            started = time.perf_counter()
            target.copy_(source, non_blocking=True)
            self.synchronize()
            times.append(time.perf_counter() - started)
        del source, target
        return num_bytes / sorted(times[2:])[len(times[2:]) // 2] / 1e9

    def allocate_cache(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: str) -> int:
        self.cache = []
        self.block_size = block_size
        shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)
        self.cache = [torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device) for _ in range(num_layers)]
        self.receivers.clear()
        return sum(t.numel() * t.element_size() for t in self.cache)

    def serve(self, transport: str) -> str:
        from kv_transfer import KVReceiver, get_transport

        async def start():
            server = get_transport(transport).make_server(token=TOKEN)
            return server, await server.start("127.0.0.1")

        if transport not in self.servers:
            self.servers[transport], _ = self.on_loop(start())
        server = self.servers[transport]
        if transport not in self.receivers:
            self.receivers[transport] = KVReceiver(server, self.cache, self.block_size)
        return server.address

    def reserve(self, transport: str, request_id: str, block_ids: list[int], num_tokens: int, lease_s: float):
        receiver = self.receivers[transport]

        async def reserve():
            return receiver.reserve(request_id, block_ids, num_tokens, lease_s)

        return self.on_loop(reserve())

    def wait(self, transport: str, request_id: str) -> dict:
        """Until every layer landed: {"landed_at", "num_bytes", "seconds"} or {"error"}."""
        receiver = self.receivers[transport]

        async def wait():
            try:
                stats = await receiver.wait_complete(request_id)
            except Exception as error:
                return {"error": f"{type(error).__name__}: {error}", "landed_at": time.monotonic()}
            return {"landed_at": time.monotonic(), "num_bytes": stats.num_bytes, "seconds": stats.seconds}

        return self.on_loop(wait())

    def checksums(self, block_ids: list[int]) -> list[int]:
        return kv_checksums(self.cache, block_ids)

    def poison(self, block_ids: list[int]) -> None:
        """Overwrite these blocks (bits no transfer sends), so that a check after the next transfer sees only it."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        for layer in self.cache:
            layer.index_fill_(0, index, -7.0)
        self.synchronize()

    def close(self) -> None:
        async def close_all():
            for server in self.servers.values():
                await server.close()

        try:
            self.on_loop(close_all(), 30)
        finally:
            super().close()


class PrefillSide(_Side):
    def __init__(self, device: torch.device):
        super().__init__(device)
        self.clients: dict[str, Any] = {}
        self.senders: dict[str, Any] = {}
        self.layer_chunks: list[list[torch.Tensor]] = []
        self.model = None
        self.cache: list[torch.Tensor] = []

    def _sender(self, transport: str):
        from kv_transfer import KVSender, get_transport

        if transport not in self.clients:
            self.clients[transport] = get_transport(transport).make_client(token=TOKEN)
            self.senders[transport] = KVSender(self.clients[transport])
        return self.senders[transport]

    # --- throughput: pre-packed chunks, as KVSender.push_layer would produce them ------------------------------

    def prepare_chunks(self, info, seed: int) -> list[int]:
        """Random KV for every layer of `info`, laid out block by block and cut into the reservation's chunks
        (runs of consecutive destination blocks); returns the checksums the decode side must find."""
        self.layer_chunks = []
        generator = torch.Generator(device=self.device).manual_seed(seed)
        num_blocks = -(-info.num_tokens // info.block_size)
        runs = [chunk.num_blocks for chunk in info.chunks()]
        packed_layers = []
        for _ in range(info.num_layers):
            packed = torch.randn((num_blocks, 2, info.block_size, info.num_kv_heads, info.head_dim),
                                 generator=generator, device=self.device).to(getattr(torch, info.dtype))
            packed_layers.append(packed)
            self.layer_chunks.append(list(packed.split(runs)))  # contiguous views, no copy
        self.synchronize()
        return kv_checksums(packed_layers, list(range(num_blocks)))

    def send_all(self, transport: str, info) -> dict:
        """Every layer's chunks at once (as a fast prefill would queue them); {"started_at", "sent_at", "num_bytes"}."""
        self._sender(transport)
        client = self.clients[transport]

        async def send():
            await client.connect(info.address)
            started = time.monotonic()
            sizes = await asyncio.gather(*(client.send(info.address, info.transfer_id, layer, chunks)
                                           for layer, chunks in enumerate(self.layer_chunks)))
            return {"started_at": started, "sent_at": time.monotonic(), "num_bytes": sum(sizes)}

        return self.on_loop(send())

    def connect(self, transport: str, address: str) -> None:
        self.on_loop(self._sender(transport).connect(address))

    # --- time to first token -----------------------------------------------------------------------------------

    def build_model(self, preset: str, seed: int, max_tokens: int, block_size: int) -> dict:
        """The preset's architecture with random weights drawn on the device (no checkpoint: writing and reading
        16 GB of safetensors would take minutes), plus a paged cache for the colocated runs."""
        from mesh.config import ModelConfig
        from mesh.kv_cache import allocate_kv_cache
        from mesh.model import CausalLM
        from mesh.presets import PRESETS

        raw = dict(PRESETS[preset], max_position_embeddings=max(max_tokens, PRESETS[preset]["max_position_embeddings"]))
        config = ModelConfig.from_hf_dict(raw)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        started = time.monotonic()
        model = CausalLM(config, dtype=dtype, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator, device=self.device, dtype=torch.float32)
                if parameter.dim() == 1:  # RMSNorm weights
                    parameter.copy_(1.0 + 0.05 * noise)
                elif "embed_tokens" in name:
                    parameter.copy_(noise)
                else:  # linear layers and the head: std 1/sqrt(fan_in), as mesh.presets draws them
                    parameter.copy_(noise * parameter.shape[1] ** -0.5)
                del noise
        self.model = model.eval()
        num_blocks = -(-max_tokens // block_size)
        self.cache = allocate_kv_cache(self.model, num_blocks, block_size)
        self.block_size = block_size
        self.synchronize()
        num_parameters = sum(p.numel() for p in model.parameters())
        return {"num_parameters": num_parameters, "seconds": time.monotonic() - started,
                "num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                "dtype": str(dtype).removeprefix("torch.")}

    def _prompt(self, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.model.config.vocab_size, (num_tokens,), generator=generator)
        return ids.to(self.device), torch.arange(num_tokens, device=self.device)

    def prefill_colocated(self, num_tokens: int, seed: int) -> dict:
        """Prefill into this GPU's own paged cache, then sample: TTFT with no transfer."""
        from mesh.attention import AttentionBatch
        from mesh.sampling import SamplingParams, sample

        ids, positions = self._prompt(num_tokens, seed)
        block_ids = list(range(-(-num_tokens // self.block_size)))
        batch = AttentionBatch(query_lens=[num_tokens], context_lens=[0], block_tables=[block_ids],
                               logits_indices=AttentionBatch.last_token_indices([num_tokens], self.device))
        self.synchronize()
        started = time.monotonic()
        logits = self.model(ids, positions, batch, self.cache)
        token = int(sample(logits, [SamplingParams(max_tokens=1)], [0]).item())
        ttft = time.monotonic() - started
        return {"ttft_s": ttft, "token": token, "checksums": kv_checksums(self.cache, block_ids)}

    def prefill_disaggregated(self, transport: str, info, seed: int) -> dict:
        """Prefill with no local cache; each layer's K/V is pushed to the decode side from the layer hook (while
        the next layers compute). Returns when the token is sampled and every send completed."""
        from mesh.attention import AttentionBatch
        from mesh.sampling import SamplingParams, sample

        sender = self._sender(transport)
        ids, positions = self._prompt(info.num_tokens, seed)
        batch = AttentionBatch(query_lens=[info.num_tokens], context_lens=[0], block_tables=None,
                               logits_indices=AttentionBatch.last_token_indices([info.num_tokens], self.device))

        def push(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # Wait only until the push is queued: its packing kernels then follow this layer's K/V on the stream.
            self.on_loop(sender.push_layer(info, layer, k, v))

        self.synchronize()
        started = time.monotonic()
        logits = self.model(ids, positions, batch, None, push)
        token = int(sample(logits, [SamplingParams(max_tokens=1)], [0]).item())
        sampled_at = time.monotonic()
        stats = self.on_loop(sender.finish(info, timeout_s=60))
        return {"started_at": started, "sampled_at": sampled_at, "sent_at": time.monotonic(), "token": token,
                "num_bytes": stats.num_bytes}

    def close(self) -> None:
        async def close_all():
            for client in self.clients.values():
                await client.close()

        try:
            self.on_loop(close_all(), 30)
        finally:
            super().close()

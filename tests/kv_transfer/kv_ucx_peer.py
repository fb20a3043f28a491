"""A prefill-side peer in its own OS process for the transport tests (ucx, nccl), driven over a multiprocessing pipe.
`Peer` starts one and speaks to it; `job` builds the push jobs below. The peer sends the KV in the reservation's
dtype, on `device` ("cpu", or "cuda:N" for GPU tests).

Commands (tuples), each answered with one reply:
  ("connect", address, token)            -> ("ok", None) | ("error", exception type name, message)
  ("push", jobs)                         -> one reply per job, in order, after all jobs ran concurrently.
      job = dict(info=ReservationInfo, seed=int, layers=list[int], delay_s=float, finish=bool)
      pushes `layers` of the KV made from `seed` (kv_test_helpers.make_kv), sleeping delay_s before each,
      then optionally finishes: ("ok", num_bytes) | ("error", type, message)
  ("push_async", jobs)                   -> ("started", None) at once; the pushes go on in the background
  ("stop",)                              -> ("ok", None), then the process exits
"""

from __future__ import annotations

import asyncio
import multiprocessing

import torch

from kv_test_helpers import make_kv
from kv_transfer import KVSender, TransportOptions, get_transport


class Peer:
    """A prefill process running this module, spoken to over a pipe."""

    def __init__(self, token: str, *, transport: str = "ucx", device: str = "cpu"):
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(target=main, args=(child_end, token, transport, device), daemon=True)
        self.process.start()
        child_end.close()

    async def call(self, command, timeout_s: float = 30.0):
        self._connection.send(command)
        loop = asyncio.get_running_loop()
        # Poll in a thread: the event loop must keep running, the KV server lives on it.
        if not await loop.run_in_executor(None, self._connection.poll, timeout_s):
            raise TimeoutError(f"peer did not answer {command[0]!r} within {timeout_s}s")
        return self._connection.recv()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self._connection.send(("stop",))
                self.process.join(10)
        finally:
            if self.process.is_alive():
                self.kill()


def job(info, seed, layers=None, *, delay_s=0.0, finish=True) -> dict:
    """A push job for `info` (all layers unless `layers` is given)."""
    return dict(info=info, seed=seed, layers=list(range(info.num_layers)) if layers is None else layers,
                delay_s=delay_s, finish=finish)


def main(connection, token: str, transport_name: str = "ucx", device: str = "cpu") -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve(connection, token, transport_name, torch.device(device)))


async def _serve(connection, token: str, transport_name: str, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    transport = get_transport(transport_name)
    options = TransportOptions(peer_name="test-prefill")
    client = transport.make_client(token=token, options=options)
    sender = KVSender(client)
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task] = set()
    try:
        while True:
            command = await loop.run_in_executor(None, connection.recv)
            kind = command[0]
            if kind == "stop":
                connection.send(("ok", None))
                return
            if kind == "connect":
                _, address, other_token = command
                probe = transport.make_client(token=other_token, options=options)
                try:
                    await probe.connect(address)
                    connection.send(("ok", None))
                except Exception as error:
                    connection.send(("error", type(error).__name__, str(error)))
                finally:
                    await probe.close()
            elif kind == "push":
                replies = await asyncio.gather(*(_run_job(sender, push_job, device) for push_job in command[1]))
                connection.send(replies)
            elif kind == "push_async":
                for push_job in command[1]:
                    task = asyncio.create_task(_run_job(sender, push_job, device))
                    background.add(task)
                    task.add_done_callback(background.discard)
                connection.send(("started", None))
    finally:
        await client.close()


async def _run_job(sender: KVSender, push_job: dict, device: torch.device):
    info = push_job["info"]
    kv = make_kv(push_job["seed"], info.num_layers, info.num_tokens, info.num_kv_heads, info.head_dim,
                 dtype=getattr(torch, info.dtype))
    kv = [(k.to(device), v.to(device)) for k, v in kv]
    try:
        for layer in push_job["layers"]:
            if push_job.get("delay_s"):
                await asyncio.sleep(push_job["delay_s"])
            await sender.push_layer(info, layer, *kv[layer])
        if push_job.get("finish", True):
            stats = await sender.finish(info, timeout_s=20)
            return ("ok", stats.num_bytes)
        return ("ok", None)
    except Exception as error:
        return ("error", type(error).__name__, str(error))

"""A prefill-side peer in its own OS process for the UCX tests, driven over a multiprocessing pipe.

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

import torch

from kv_test_helpers import make_kv
from kv_transfer import KVSender, TransportOptions, get_transport


def main(connection, token: str) -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve(connection, token))


async def _serve(connection, token: str) -> None:
    transport = get_transport("ucx")
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
                replies = await asyncio.gather(*(_run_job(sender, job) for job in command[1]))
                connection.send(replies)
            elif kind == "push_async":
                for job in command[1]:
                    task = asyncio.create_task(_run_job(sender, job))
                    background.add(task)
                    task.add_done_callback(background.discard)
                connection.send(("started", None))
    finally:
        await client.close()


async def _run_job(sender: KVSender, job: dict):
    info = job["info"]
    kv = make_kv(job["seed"], info.num_layers, info.num_tokens, info.num_kv_heads, info.head_dim)
    try:
        for layer in job["layers"]:
            if job.get("delay_s"):
                await asyncio.sleep(job["delay_s"])
            await sender.push_layer(info, layer, *kv[layer])
        if job.get("finish", True):
            stats = await sender.finish(info, timeout_s=20)
            return ("ok", stats.num_bytes)
        return ("ok", None)
    except Exception as error:
        return ("error", type(error).__name__, str(error))

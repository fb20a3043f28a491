"""Shared by the prefill-tier tests."""

import asyncio
import threading

import pytest


@pytest.fixture
def loop():
    """An event loop running on its own thread, as a rank's KV sender uses it (the step thread posts onto it)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)

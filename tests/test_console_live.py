"""Live updates (server-sent events): each page gets only what its user may see, a page that
cannot keep up is told to reload instead of holding the others back, and streams end when the
server stops."""

from __future__ import annotations

import asyncio
import json

from ctl.console.live import QUEUE_MAX, Hub


def _run(coro):
    return asyncio.run(coro)


async def _collect(hub: Hub, allow, n: int, before_read=None) -> list[str]:
    async def never() -> bool:
        return False

    out = []
    stream = hub.stream(allow, never)
    out.append(await stream.__anext__())  # the retry line; the page is now registered
    if before_read is not None:
        before_read()
    async for chunk in stream:
        out.append(chunk)
        if len(out) > n:
            break
    await stream.aclose()
    return out


def test_pages_get_only_what_their_user_may_see():
    hub = Hub()

    def publish():
        hub.publish("device", {"device": "theirs", "status": "offline"})
        hub.publish("device", {"device": "mine", "status": "offline"})

    chunks = _run(_collect(hub, lambda kind, d: d["device"] == "mine", 1, publish))
    assert chunks[0].startswith("retry:")
    event = chunks[1].splitlines()
    assert event[0] == "event: device" and json.loads(event[1][6:])["device"] == "mine"
    assert hub.clients == 0  # the page went away: forgotten


def test_a_slow_page_is_told_to_reload_and_close_ends_streams():
    hub = Hub()

    def flood():
        for i in range(QUEUE_MAX + 50):
            hub.publish("device", {"device": f"d{i}"})

    chunks = _run(_collect(hub, lambda k, d: True, QUEUE_MAX + 100, flood))
    assert chunks[-1].startswith("event: reload")
    assert len(chunks) < QUEUE_MAX + 2  # it did not get the rest

    async def closing():
        async def never() -> bool:
            return False

        stream = hub.stream(lambda k, d: True, never)
        await stream.__anext__()
        hub.close()
        return [c async for c in stream]

    assert _run(closing()) == []  # the stream ended at once

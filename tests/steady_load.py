"""A steady stream of poster requests against a running service, every answer recorded (rollout, autoscaling).

``with SteadyLoad(url, clients=4) as load:`` keeps ``clients`` requests in flight, back to back,
from an asyncio loop in a thread of its own, so the test's own thread is free to switch models or
watch Serve meanwhile. Each answer is an :class:`Answer`: when it was sent and answered (on
``time.monotonic()``), its status (0: no HTTP answer at all) and the ``model_version`` it carries.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx

from support import noisy_jpeg_bytes


@dataclass(frozen=True)
class Answer:
    sent: float
    done: float
    status: int
    version: str | None
    error: str = ""


class SteadyLoad:
    """``clients`` concurrent clients posting to ``url``/v1/predict until the block ends."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.clients = url, clients
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._posters = [noisy_jpeg_bytes(i, size=(60, 90)) for i in range(8)]

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        """Until at least ``count`` answers came back (the service is warm and the stream steady)."""
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"only {len(self.answers)} answers in {timeout_s} s"
            time.sleep(0.05)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        n = index
        while not self._stop.is_set():
            poster = self._posters[n % len(self._posters)]
            n += self.clients
            sent = time.monotonic()
            try:
                response = await client.post(f"{self.url}/v1/predict",
                                             files={"poster": ("p.jpg", poster, "image/jpeg")})
            except httpx.HTTPError as exc:
                self.answers.append(Answer(sent, time.monotonic(), 0, None, repr(exc)[:300]))
                continue
            ok = response.status_code == 200
            self.answers.append(Answer(sent, time.monotonic(), response.status_code,
                                       response.json()["model_version"] if ok else None,
                                       "" if ok else response.text[:300]))

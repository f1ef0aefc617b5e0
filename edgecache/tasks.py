"""Owned background tasks: every task is named, referenced, cancelled and awaited at shutdown (STYLE rule 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("edgecache.tasks")


class TaskOwner:
    """Spawns and keeps background tasks; :meth:`close` drains or cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    def pending(self, prefix: str = "") -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if t.get_name().startswith(prefix)]

    async def drain(self, prefix: str, timeout: float) -> None:
        """Let tasks whose name starts with ``prefix`` finish, up to ``timeout`` seconds."""
        tasks = self.pending(prefix)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

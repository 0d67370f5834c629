"""Channel adapters: one per way messages arrive, all behind the `Channel` protocol.

An adapter receives, builds an `Inbound` (raw bytes kept), awaits `submit` and
acknowledges to its source only after that returned, i.e. after the commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.message import Inbound
from gateway.pipeline import Disposition

Submit = Callable[[Inbound], Awaitable[Disposition]]


class Channel(Protocol):
    """What the daemon needs of every channel adapter."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop accepting; finish (and acknowledge) messages already in flight."""
        ...

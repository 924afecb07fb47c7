"""Fixtures of the hook tests: hooks that send through either transport."""

from __future__ import annotations

import asyncio

import pytest

from airflow_provider_pepipost.hooks.pepipost import PepipostHook


class LoopSendingHook(PepipostHook):
    """The hook with send_message made as a campaign makes it on the event loop: asend_message."""

    def send_message(self, message):
        async def send():
            try:
                return await self.asend_message(message)
            finally:
                self.aclose()

        return asyncio.run(send())


@pytest.fixture(params=["threads", "event_loop"])
def hook_for(request, pepipost_conn):
    """A hook for ``base_url``; its sends through each transport in turn (the same words, retries, limits)."""

    def make(base_url: str, **extra: object) -> PepipostHook:
        pepipost_conn(base_url, **extra)
        return PepipostHook() if request.param == "threads" else LoopSendingHook()

    return make

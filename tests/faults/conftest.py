"""Fault tests: the modules that send run once on each transport of a campaign."""

from __future__ import annotations

import pytest

# The modules whose guarantees rest on how the requests are made: each of their tests runs with
# the event loop (the default) and with the threads ([pepipost] send_transport = threads).
BOTH_TRANSPORTS = {"test_send_faults", "test_hostile_network", "test_template_campaign", "test_kill_and_retry"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rpartition(".")[2] in BOTH_TRANSPORTS:
        metafunc.fixturenames.append("send_transport")
        metafunc.parametrize("send_transport", ["event_loop", "threads"], indirect=True)


@pytest.fixture
def send_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", request.param)
    return request.param

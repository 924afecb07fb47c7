"""Fault tests: the modules that send run once on each transport of a campaign."""

from __future__ import annotations

import os

import pytest

# The modules whose guarantees rest on how the requests are made: each of their tests runs with
# the event loop (the default) and with the threads ([pepipost] send_transport = threads).
BOTH_TRANSPORTS = {"test_send_faults", "test_hostile_network", "test_template_campaign", "test_kill_and_retry"}
TRANSPORTS = ("event_loop", "threads")


def transports_to_run() -> list[str]:
    """Both, unless PEPIPOST_TEST_TRANSPORTS names fewer (``make test-lines`` runs the older Airflow
    lines on the default one: the transports do not change with Airflow, the main line runs both)."""
    chosen = os.environ.get("PEPIPOST_TEST_TRANSPORTS", "").replace(",", " ").split() or list(TRANSPORTS)
    unknown = [name for name in chosen if name not in TRANSPORTS]
    if unknown:
        raise pytest.UsageError(f"PEPIPOST_TEST_TRANSPORTS: {', '.join(unknown)} is not one of {', '.join(TRANSPORTS)}")
    return list(dict.fromkeys(chosen))  # each once, however often named


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rpartition(".")[2] in BOTH_TRANSPORTS:
        metafunc.fixturenames.append("send_transport")
        metafunc.parametrize("send_transport", transports_to_run(), indirect=True)


@pytest.fixture
def send_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", request.param)
    return request.param

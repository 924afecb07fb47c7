"""``pepipost-webhook``'s limits: the queue bound is reached before uvicorn's connection cap, and the
settings reach the worker processes through the environment."""

from __future__ import annotations

import math
import os
import resource

import pytest

from airflow_provider_pepipost.webhook import cli
from airflow_provider_pepipost.webhook.server import GuardedHttpProtocol
from airflow_provider_pepipost.webhook.settings import (
    CONNECTIONS_BEYOND_QUEUE,
    DEFAULT_COMMIT_LINGER,
    DEFAULT_MAX_QUEUED_BODIES,
    ReceiverSettings,
)


def parsed(*argv: str):
    return cli._serve_parser().parse_args(list(argv))


def test_by_default_the_connection_cap_is_above_the_queue_bound():
    args = parsed()
    assert args.max_queued_bodies == DEFAULT_MAX_QUEUED_BODIES
    assert cli.limit_concurrency(args) == DEFAULT_MAX_QUEUED_BODIES + CONNECTIONS_BEYOND_QUEUE


def test_the_connection_cap_follows_a_larger_queue_unless_given():
    assert cli.limit_concurrency(parsed("--max-queued-bodies", "4000")) == 4000 + CONNECTIONS_BEYOND_QUEUE
    assert cli.limit_concurrency(parsed("--limit-concurrency", "300")) == 300  # given: kept, with a warning


def test_the_open_file_limit_is_raised_for_the_connections_within_the_hard_limit(monkeypatch):
    limits = {"now": (256, 100_000)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    assert cli.open_file_room(1152) == 1152 + cli.OTHER_OPEN_FILES == limits["now"][0]
    limits["now"] = (256, 512)  # the hard limit is as far as it goes
    assert cli.open_file_room(1152) == 512


def test_the_commit_linger_reaches_the_workers(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    monkeypatch.setattr(GuardedHttpProtocol, "head_timeout", GuardedHttpProtocol.head_timeout)
    cli._hand_over(parsed("--commit-linger", "0"), "token")
    assert ReceiverSettings.from_env().commit_linger == 0.0
    cli._hand_over(parsed(), "token")
    assert ReceiverSettings.from_env().commit_linger == DEFAULT_COMMIT_LINGER


@pytest.mark.parametrize("linger", [0.0, 0.005])
def test_the_app_hands_the_linger_to_its_queue(linger, sqlite_url):
    from airflow_provider_pepipost.webhook.app import Receiver

    receiver = Receiver(ReceiverSettings(token="t", store_url=sqlite_url, commit_linger=linger))
    assert receiver.queue.linger == linger


@pytest.mark.parametrize("given", ["nan", "0", "-1"])
def test_a_body_timeout_that_is_no_time_limit_is_refused_naming_the_option(given, capsys, monkeypatch):
    # NaN never compares past a deadline: the body of a stalled client would be waited for forever.
    with pytest.raises(SystemExit):
        parsed("--body-timeout", given)
    assert "--body-timeout" in capsys.readouterr().err
    monkeypatch.setenv("PEPIPOST_WEBHOOK_BODY_TIMEOUT", given)
    with pytest.raises(ValueError, match=r"body_timeout .*PEPIPOST_WEBHOOK_BODY_TIMEOUT.* above 0"):
        ReceiverSettings.from_env()


@pytest.mark.parametrize(
    ("option", "given"),
    [
        ("--head-timeout", "nan"),  # a stalled client's head would be waited for forever
        ("--head-timeout", "inf"),
        ("--head-timeout", "0"),
        ("--body-timeout", "inf"),
        ("--keep-alive", "nan"),
        ("--keep-alive", "inf"),
        ("--keep-alive", "-5"),
        ("--commit-linger", "nan"),
        ("--commit-linger", "-0.1"),
        ("--max-body-bytes", "0"),
        ("--max-queued-bodies", "0"),
        ("--limit-concurrency", "-1"),
        ("--workers", "0"),
    ],
)
def test_a_limit_that_is_no_limit_is_refused_naming_the_option(option, given, capsys):
    with pytest.raises(SystemExit):
        parsed(option, given)
    assert option in capsys.readouterr().err


def test_the_limits_take_the_values_they_mean():
    args = parsed("--head-timeout", "0.5", "--keep-alive", "30", "--commit-linger", "0", "--workers", "2")
    assert (args.head_timeout, args.keep_alive, args.commit_linger, args.workers) == (0.5, 30.0, 0.0, 2)
    # uvicorn closes the connection after each answer at 0; a linger is bounded by the last commit's time.
    assert (parsed("--keep-alive", "0").keep_alive, parsed("--commit-linger", "inf").commit_linger) == (0.0, math.inf)


@pytest.mark.parametrize(
    "option", ["--workers", "--max-body-bytes", "--head-timeout", "--keep-alive", "--commit-linger"]
)
def test_a_value_that_is_no_number_is_refused_saying_what_the_option_wants(option, capsys):
    with pytest.raises(SystemExit):
        parsed(option, "abc")
    err = capsys.readouterr().err
    assert f"argument {option}: must be a" in err and "'abc'" in err and "invalid" not in err

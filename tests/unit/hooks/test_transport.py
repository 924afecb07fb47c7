"""The transport's ground: the one "sent or not" rule as a table, and a canary on the urllib3
internals it overrides (pinned in pyproject: urllib3>=2,<3), which fails before a release that
changes them can silently break "never send twice"."""

from __future__ import annotations

import inspect

import pytest
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool

from airflow_provider_pepipost.hooks.transport import Fate, fate_of


@pytest.mark.parametrize(
    ("sent", "expired", "read_timeout", "fate"),
    [
        (False, False, False, Fate.NOT_SENT),  # DNS, refused, TLS, proxy, a write into a closed connection
        (False, True, False, Fate.NOT_SENT),  # cut at the deadline before it was written: still not sent
        (False, False, True, Fate.NOT_SENT),
        (True, True, False, Fate.PAST_DEADLINE),  # an answer trickled past the deadline
        (True, True, True, Fate.PAST_DEADLINE),
        (True, False, True, Fate.NO_ANSWER),  # no answer within the read timeout
        (True, False, False, Fate.DROPPED),  # reset after the request left
    ],
)
def test_only_a_request_that_never_left_whole_is_not_sent(sent, expired, read_timeout, fate):
    found = fate_of(sent=sent, expired=expired, read_timeout=read_timeout)
    assert found is fate
    assert found.may_have_been_processed is sent


def test_the_urllib3_internals_the_transport_overrides_are_still_there():
    major = int(urllib3.__version__.split(".")[0])
    assert major == 2, f"urllib3 {urllib3.__version__}: the transport is written against 2.x"
    # The pool hands connections out and takes them back through these two (the idle bound).
    assert list(inspect.signature(HTTPConnectionPool._get_conn).parameters) == ["self", "timeout"]
    assert list(inspect.signature(HTTPConnectionPool._put_conn).parameters) == ["self", "conn"]
    assert "ConnectionCls" in vars(HTTPConnectionPool)
    # The connection writes the whole request in request() (sent once it returns), can tell a
    # peer's close without reading (is_connected), and owns its socket as .sock.
    for connection in (HTTPConnection, HTTPSConnection):
        assert isinstance(inspect.getattr_static(connection, "is_connected"), property)
        parameters = inspect.signature(connection.request).parameters
        assert list(parameters)[:5] == ["self", "method", "url", "body", "headers"]
        assert callable(connection.connect)
    assert HTTPConnection("127.0.0.1", 1).sock is None  # unconnected until connect()

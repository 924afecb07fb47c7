"""A local Pepipost-compatible WhatsApp API for demos and tests (``pepipost-sandbox``).

It stands apart from the provider: it checks requests and writes delivery reports from the
vendor's pages with code of its own, so that one bug cannot hide on both sides of the wire.
"""

from airflow_provider_pepipost.sandbox.scenario import Scenario
from airflow_provider_pepipost.sandbox.server import DEFAULT_API_KEY, DEFAULT_SOURCE, SandboxServer

__all__ = ["DEFAULT_API_KEY", "DEFAULT_SOURCE", "SandboxServer", "Scenario"]

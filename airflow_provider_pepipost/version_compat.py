"""The Airflow versions this provider supports, and the switches for what differs between them.

Importing the provider on an Airflow outside the range fails at once with a message naming the
range (``check_airflow``), rather than somewhere deep in a DAG's run. Features that need a newer
Airflow than the oldest supported ask here (``HAS_SHARED_STREAMS``) and degrade, never break.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

OLDEST_SUPPORTED = Version("3.1.0")  # the first Airflow with the human-in-the-loop operators
NEWEST_LINE = Version("3.3")  # the newest line tested; 3.4 and later are not claimed
SUPPORTED_RANGE = "Apache Airflow 3.1, 3.2 and 3.3"


def airflow_version() -> Version:
    """The installed Airflow's version (its release: 3.3.2rc1 counts as 3.3.2)."""
    try:
        found = Version(version("apache-airflow"))
    except PackageNotFoundError:
        try:
            found = Version(version("apache-airflow-core"))
        except PackageNotFoundError:
            raise ImportError(f"airflow-provider-pepipost needs {SUPPORTED_RANGE}; none is installed") from None
    return Version(found.base_version)


def check_airflow(found: Version | None = None) -> Version:
    """The installed Airflow's version; ImportError naming the supported range when it is outside it."""
    found = found if found is not None else airflow_version()
    if found < OLDEST_SUPPORTED or (found.major, found.minor) > (NEWEST_LINE.major, NEWEST_LINE.minor):
        raise ImportError(
            f"airflow-provider-pepipost supports {SUPPORTED_RANGE}; this is Apache Airflow {found}. "
            f"Install a version of the provider made for it, or an Airflow in the range."
        )
    return found


AIRFLOW_VERSION = check_airflow()
AIRFLOW_V_3_3_PLUS = Version("3.3.0") <= AIRFLOW_VERSION
# Shared streams and ack mode for event triggers (WhatsAppReplyTrigger's shared feed): 3.3 and later.
HAS_SHARED_STREAMS = AIRFLOW_V_3_3_PLUS

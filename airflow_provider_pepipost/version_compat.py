"""The Airflow versions this provider supports, and the switches for what differs between them.

Importing the provider on an Airflow outside the range fails at once with a message naming the
range (``check_airflow``), rather than somewhere deep in a DAG's run. Features that need a newer
Airflow than the oldest supported ask here (``HAS_SHARED_STREAMS``) and degrade, never break; names that
moved between the lines (the task exceptions) are imported from here.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

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
AIRFLOW_V_3_2_PLUS = Version("3.2.0") <= AIRFLOW_VERSION
AIRFLOW_V_3_3_PLUS = Version("3.3.0") <= AIRFLOW_VERSION
# Shared streams and ack mode for event triggers (WhatsAppReplyTrigger's shared feed): 3.3 and later.
HAS_SHARED_STREAMS = AIRFLOW_V_3_3_PLUS

# The task exceptions moved to the Task SDK in 3.2 (airflow.exceptions keeps deprecated aliases of
# them); 3.1's task runner catches the ones in airflow.exceptions, and airflow.sdk.exceptions lacks
# them there. Imported on first use, not here: the package imports this module before it defines
# get_provider_info, and importing Airflow 3.2+ loads that entry point (a circular import).
_MOVED_TO_THE_TASK_SDK = {"AirflowFailException", "AirflowSensorTimeout", "AirflowSkipException", "TaskDeferred"}

if TYPE_CHECKING:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowSkipException, TaskDeferred


def __getattr__(name: str) -> Any:
    if name not in _MOVED_TO_THE_TASK_SDK:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module("airflow.sdk.exceptions" if AIRFLOW_V_3_2_PLUS else "airflow.exceptions"), name)
    globals()[name] = value
    return value


__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_2_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "HAS_SHARED_STREAMS",
    "AirflowFailException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "TaskDeferred",
]

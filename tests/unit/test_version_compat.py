"""The provider on an Airflow it does not support: a clear error naming the range, at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from packaging.version import Version

from airflow_provider_pepipost.version_compat import SUPPORTED_RANGE, check_airflow


@pytest.mark.parametrize("found", ["3.1.0", "3.1.8", "3.2.1", "3.3.0", "3.3.2"])
def test_the_lines_it_claims_are_taken(found):
    assert check_airflow(Version(found)) == Version(found)


@pytest.mark.parametrize("found", ["2.10.5", "3.0.6", "3.4.0", "4.0.0"])
def test_an_airflow_outside_the_range_fails_naming_the_range(found):
    with pytest.raises(ImportError, match=f"supports {SUPPORTED_RANGE}; this is Apache Airflow {found}"):
        check_airflow(Version(found))


def test_the_provider_imports_before_airflow_and_gives_the_task_exceptions_of_this_line():
    """Importing Airflow loads the provider's entry point (get_provider_info, in the package's
    __init__): version_compat imports nothing of Airflow until a moved name is asked for."""
    code = (
        "import airflow_provider_pepipost, sys; assert 'airflow' not in sys.modules\n"
        "from airflow_provider_pepipost.version_compat import AIRFLOW_V_3_2_PLUS, AirflowFailException\n"
        "from airflow.providers_manager import ProvidersManager\n"
        "assert 'airflow-provider-pepipost' in ProvidersManager().providers\n"
        "print(AirflowFailException.__module__, AIRFLOW_V_3_2_PLUS)"
    )
    # Deprecation warnings as errors: a moved name taken from its old module fails here on 3.2+.
    command = [sys.executable, "-W", "error::DeprecationWarning", "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] in (["airflow.sdk.exceptions", "True"], ["airflow.exceptions", "False"])

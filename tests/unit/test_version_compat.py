"""The provider on an Airflow it does not support: a clear error naming the range, at import."""

from __future__ import annotations

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

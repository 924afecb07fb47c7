"""Which phone a number reaches, as the sandbox counts sends and consent: its own rule, kept apart
from the provider's (``airflow_provider_pepipost.numbers``) so that one bug cannot hide on both
sides of the wire."""

from __future__ import annotations

import re

_DECORATION = re.compile(r"[\s()+.\-]")


def subscriber(number: str) -> str:
    """'0091 98…', '+91 98…' and '9198…' are one subscriber: decoration and a leading 00 dropped."""
    digits = _DECORATION.sub("", number)
    return digits[2:] if digits.startswith("00") else digits

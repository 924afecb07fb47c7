"""A phone number's one canonical form, and how a number is shown where every DAG reader can see it.

Pure code, no I/O. Every writer and reader of a number (audience rows, the ledger, consent rows,
inbound replies, delivery reports, the suppression list) goes through ``canonical_number``, so
that a number that said STOP is the same string however it was written: ``+91 98330-78369``,
``0091 98330 78369`` and ``(91) 9833078369`` are all ``919833078369``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from typing import Any

# The API rejects numbers shorter than 10 or longer than 15 digits (country code included).
MIN_PHONE_DIGITS, MAX_PHONE_DIGITS = 10, 15
# Written between the digits of a number: '+', brackets, dots and slashes; dashes and spaces of
# every kind (Unicode categories Pd and Z) and invisible format characters (Cf: the
# left-to-right marks a spreadsheet copies along) are removed by category below.
_DECORATION = frozenset("+()[]./")
_INTERNATIONAL_PREFIX = "00"


def _is_decoration(char: str) -> bool:
    return char in _DECORATION or char.isspace() or unicodedata.category(char) in ("Pd", "Cf", "Zs", "Zl", "Zp")


def canonical_number(value: Any) -> str:
    """The one spelling of a number: digits with country code, nothing else.

    Removes '+', spaces, dashes, brackets, dots and invisible characters, turns digits of any
    script into ASCII, and drops a leading ``00`` international prefix. Does not judge the
    result: a value that holds letters keeps them (see ``normalize_phone``).
    """
    text = str(value)
    if text.isascii() and text.isdigit():  # already plain digits, as most rows are: nothing to remove
        return text[len(_INTERNATIONAL_PREFIX) :] if text.startswith(_INTERNATIONAL_PREFIX) else text
    chars = []
    for char in text:
        if _is_decoration(char):
            continue
        digit = unicodedata.decimal(char, None)
        chars.append(str(digit) if digit is not None else char)
    text = "".join(chars)
    return text[len(_INTERNATIONAL_PREFIX) :] if text.startswith(_INTERNATIONAL_PREFIX) else text


def normalize_phone(value: Any) -> str:
    """The canonical number of a row's value: '+91 98330-78369' -> '919833078369'.

    Raises ValueError with the reason when the value cannot be a WhatsApp number.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a phone number string, not {type(value).__name__}")
    text = canonical_number(value)
    if not text:
        raise ValueError("is empty")
    if not (text.isascii() and text.isdigit()):
        raise ValueError("may hold only digits, spaces, dashes, brackets and a leading + or 00")
    if not MIN_PHONE_DIGITS <= len(text) <= MAX_PHONE_DIGITS:
        raise ValueError(
            f"has {len(text)} digits; a number with its country code has {MIN_PHONE_DIGITS} to {MAX_PHONE_DIGITS}"
        )
    return text


def phone_or_none(value: Any) -> str | None:
    """The canonical number, or None when the value is not one (a sender the vendor mangled)."""
    try:
        return normalize_phone(value)
    except ValueError:
        return None


def mask_number(number: str | None) -> str:
    """A phone number with its middle hidden: 9198******12."""
    if not number:
        return ""
    return number if len(number) <= 6 else number[:4] + "*" * (len(number) - 6) + number[-2:]


# A number inside free text (a vendor's error message, a delivery remark): digits, with '+', '00',
# brackets and single spaces, dashes or dots between them, that make 10 to 15 digits once
# canonical. Not inside a word or an id (no letter or digit just before), and not a date.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w+])\+?\(?\d(?:[ .\-()]{0,2}\d){9,16}(?!\d)")
_DATE = re.compile(r"\(?\d{4}[-./]\d{1,2}[-./]\d{1,2}(?!\d)")


def mask_numbers_in(text: str) -> str:
    """Free text with every phone number in it masked, for places every DAG reader can see."""
    return _NUMBER_IN_TEXT.sub(_mask_found, text)


def _mask_found(found: re.Match[str]) -> str:
    candidate = found.group()
    number = canonical_number(candidate)
    if not MIN_PHONE_DIGITS <= len(number) <= MAX_PHONE_DIGITS or _DATE.match(candidate.lstrip("+")):
        return candidate
    return mask_number(number)


ERASED_PREFIX = "h:"


def number_hash(number: str, key: str) -> str:
    """What an erased number is kept as on the suppression list: a keyed one-way hash of its
    canonical form (``h:`` and 32 hex digits). Without the key, no list of numbers can be hashed
    to find it again; with it, the send path still recognises the number and never messages it."""
    digest = hmac.new(key.encode(), canonical_number(number).encode(), hashlib.sha256).hexdigest()
    return ERASED_PREFIX + digest[:32]


def keyed_hash(value: str, key: str, prefix: str = "e-") -> str:
    """A keyed one-way hash of any value (an erased row's idempotency key): ``prefix`` and 32 hex digits."""
    return prefix + hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[:32]


def key_fingerprint(key: str) -> str:
    """What the store keeps to tell the erasure key from another, without the key itself."""
    return keyed_hash("pepipost erasure key fingerprint", key, prefix="fp-")

"""Numbers inside free text are masked wherever every DAG reader looks (XCom, the page, logs), however
they are spelled; dates, times and ids are left as they are."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.numbers import canonical_number, mask_numbers_in

MASKED = "9198******69"


@pytest.mark.parametrize(
    "text",
    [
        "Recipient 919833078369 has blocked the business",
        "+919833078369 is not on WhatsApp",
        "call +91 98330 78369 now",
        "91 98330 78369 is not a WhatsApp account",
        "0091-98330-78369 unreachable",
        "(91) 98330-78369 opted out",
        "number: 91.98330.78369.",
    ],
)
def test_a_number_in_free_text_is_masked_however_it_is_spelled(text):
    masked = mask_numbers_in(text)
    assert MASKED in masked and canonical_number("919833078369") not in canonical_number(masked), masked


@pytest.mark.parametrize(
    "text",
    [
        "expired at 2026-12-06 07:35:22 UTC",
        "id a7886494264b9c1d",
        "uuid 12345678-1234-1234-1234-123456789012",
        "order 12345678901234567890",
        "row 1234 of 5678",
        "code 8003",
    ],
)
def test_dates_ids_and_short_figures_are_left_as_they_are(text):
    assert mask_numbers_in(text) == text


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("919833078369", "919833078369"),  # plain digits: the fast path
        (919833078369, "919833078369"),
        ("00919833078369", "919833078369"),  # plain digits with the international prefix
        ("+919833078369", "919833078369"),
        # Arabic-Indic digits, with the international prefix: not ASCII, so the full rule
        ("\u0660\u0660\u0669\u0661\u0669\u0668\u0663\u0663\u0660\u0667\u0668\u0663\u0666\u0669", "919833078369"),
        ("\uff19\uff11\uff19\uff18\uff13\uff13\uff10\uff17\uff18\uff13\uff16\uff19", "919833078369"),  # fullwidth
        ("91 98330\u200e78369", "919833078369"),
    ],
)
def test_a_number_of_plain_digits_and_its_other_spellings_have_one_canonical_form(value, canonical):
    assert canonical_number(value) == canonical

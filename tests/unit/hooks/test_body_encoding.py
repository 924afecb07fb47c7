"""Request bodies are encoded by msgspec: the same bytes as json.dumps(separators=(",", ":"),
ensure_ascii=False) in UTF-8, which the vendor saw before, for any text a message can hold."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from airflow_provider_pepipost.hooks.pepipost import encode_json
from airflow_provider_pepipost.messages import MediaMessage
from airflow_provider_pepipost.outgoing import request_body

# Text without lone surrogates (which no message can hold: they are refused before any send).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def dumped(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@given(st.dictionaries(TEXT, VALUES, max_size=6))
def test_any_body_encodes_to_the_bytes_json_dumps_gave(body):
    assert encode_json(body) == dumped(body)


def test_a_message_body_with_control_characters_quotes_and_line_separators():
    caption = 'Hi "Asha" \\ \x00\x1f\x7f \u2028\u2029 é ✓ 😀'
    body = request_body(MediaMessage("919800000001", "src", attachment_id="media-1", caption=caption))
    assert encode_json(body) == dumped(body)

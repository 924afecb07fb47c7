"""The Pepipost connection: its defaults and how the Airflow UI shows its form.

One definition serves Airflow 3.2+ (read from provider info, no hook import) and 3.1 (the hook's
``get_connection_form_widgets`` / ``get_ui_field_behaviour``).
"""

from __future__ import annotations

from typing import Any

CONN_TYPE = "pepipost"
DEFAULT_CONN_ID = "pepipost_default"
DEFAULT_BASE_URL = "https://waapi.pepipost.com"
DEFAULT_ENDPOINT = "/api/v2/message/"

# extra key -> (label, JSON type, default, description)
EXTRA_FIELDS: dict[str, tuple[str, str, Any, str]] = {
    "source": ("Source id", "string", None, "Default WhatsApp source id (from the vendor's source API)"),
    "endpoint": ("Send endpoint path", "string", DEFAULT_ENDPOINT, "Use /api/v2/message/nc on the Netcore host"),
    "timeout": ("Read timeout (s)", "number", 30, "No answer this long after sending: unknown, never resent"),
    "connect_timeout": ("Connect timeout (s)", "number", 10, "A connect failure is retried: nothing was sent"),
    "deadline": ("Deadline per request (s)", "number", 60, "The whole answer must be in by then; past it: unknown"),
    "max_answer_bytes": ("Largest answer (bytes)", "integer", 1048576, "A longer answer is cut off: unknown"),
    "keepalive_idle_max": (
        "Idle connection reuse (s)",
        "number",
        0.2,
        "A pooled connection idle longer than this is not reused, so a server closing idle ones cannot race a send",
    ),
    "max_retries": ("Retries of unprocessed sends", "integer", 5, "Not sent, failure bodies, 429, 503 + Retry-After"),
    "backoff_max": ("Longest wait between retries (s)", "number", 60, "Retry-After is honoured up to 10x this"),
}

# The port stays in the form: Airflow 3.3.2's Test button sends a connection without a port as
# port 0, and its API then refuses the test ("The host or port to test differs from the stored
# connection"). A connection saved with its port (443 for https) tests as it should.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["schema", "login", "extra"],
    "relabeling": {"host": "Base URL", "password": "API key"},
    "placeholders": {
        "host": DEFAULT_BASE_URL,
        "port": "443 (fill it in: the UI's Test button needs it)",
        "password": "Pepipost WhatsApp API key (sent as Bearer)",
    },
}


def provider_conn_fields() -> dict[str, Any]:
    """``conn-fields`` in the provider-info form (Airflow 3.2+)."""
    return {
        name: {
            "label": label,
            "schema": {"type": [kind, "null"], **({"default": default} if default is not None else {})},
            "description": description,
        }
        for name, (label, kind, default, description) in EXTRA_FIELDS.items()
    }


def provider_ui_field_behaviour() -> dict[str, Any]:
    """``ui-field-behaviour`` in the provider-info form (kebab-case keys)."""
    return {
        "hidden-fields": UI_FIELD_BEHAVIOUR["hidden_fields"],
        "relabeling": UI_FIELD_BEHAVIOUR["relabeling"],
        "placeholders": UI_FIELD_BEHAVIOUR["placeholders"],
    }

"""The status store's tables, in one place, with the schema version they make up.

Bump SCHEMA_VERSION and add a step to ``migrations.MIGRATIONS`` for any change to these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from airflow_provider_pepipost import limits

SCHEMA_VERSION = 12

metadata = MetaData()

# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL wants room for billions of events.
_EventId = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "pepipost_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)


def _task_instance_columns() -> list[Column]:
    """The task instance a row belongs to, as every table that keeps one names it."""
    return [
        Column("dag_id", String(limits.AIRFLOW_ID_MAX), nullable=False),
        Column("run_id", String(limits.AIRFLOW_ID_MAX), nullable=False),
        Column("task_id", String(limits.AIRFLOW_ID_MAX), nullable=False),
        Column("map_index", Integer, nullable=False),
    ]


# One row per message a task decided to send: written before the request goes out, updated with
# the outcome. A retry of the task reads it back so that nothing is sent twice.
ledger = Table(
    "pepipost_ledger",
    metadata,
    Column("idempotency_key", String(limits.IDEMPOTENCY_KEY_MAX), primary_key=True),
    Column("api_header", String(limits.API_HEADER_MAX), nullable=False),
    Column("message_id", String(limits.MESSAGE_ID_MAX), nullable=True),
    Column("recipient", String(limits.RECIPIENT_MAX), nullable=False),
    *_task_instance_columns(),
    Column("row_index", Integer, nullable=False),
    # sending -> accepted | rejected | unknown | not_sent (never went out: the campaign stopped first);
    # unknown -> accepted when a report reconciles it
    Column("state", String(limits.LEDGER_STATE_MAX), nullable=False),
    Column("error_code", String(limits.ERROR_CODE_MAX), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("sent_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("reconciled_at", Float, nullable=True),
    # The try that claimed the row (a random id per try): a later try may take over a row that
    # was refused or never sent, the same try may not. Tries are told apart without clocks.
    Column("attempt", String(limits.ATTEMPT_MAX), nullable=True),
    # The campaign the row belongs to (a hash of the campaign key): a task instance that sent two
    # campaigns (a new campaign_key to send again on purpose) is summarised one campaign at a time.
    Column("campaign", String(limits.CAMPAIGN_HASH_MAX), nullable=True),
    # v7: how many times the run had been cleared when the row was claimed (Airflow's
    # clear_number). A row that another task instance of the same run holds from an earlier clear
    # is taken over, not sent again; one it holds from this clear is a duplicate row.
    Column("generation", Integer, nullable=True),
    Index("ix_pepipost_ledger_task", "dag_id", "run_id", "task_id", "map_index"),
    Index("ix_pepipost_ledger_message_id", "message_id", unique=True),
    Index("ix_pepipost_ledger_api_header", "api_header"),
)

# The current status of each message, moved only up the rank ladder (status.model.STATUS_RANK).
# Keyed by message id alone, so that a report arriving before the ledger row still counts.
message_status = Table(
    "pepipost_message_status",
    metadata,
    Column("message_id", String(limits.MESSAGE_ID_MAX), primary_key=True),
    Column("status", String(limits.STATUS_MAX), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("remark", Text, nullable=False, default=""),
    Column("reported_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    # v6: when the message was first reported delivered (or read) and first read: the vendor's
    # time, else the receiver's. Kept here so that the campaign page reads no events.
    Column("delivered_at", Float, nullable=True),
    Column("read_at", Float, nullable=True),
    # v8: what the conversation cost, from the first report of a webhook v2 that carried pricing
    # (v1 reports carry none: NULL is "not reported", never "free").
    Column("billable", Boolean, nullable=True),
    Column("category", String(limits.PRICING_MAX), nullable=True),  # marketing, utility, ...
    Column("pricing_model", String(limits.PRICING_MAX), nullable=True),
)

# v8: one row per input row of a send task instance, with the task's own state for it: what XCom
# ``messages`` says, kept for the campaign page and its CSV (the ledger above has one row per send
# attempt: a session message refused with 8007 and its template are two). ``ledger_key`` names the
# ledger row of the message that stands for the row, whose message id and status the page reads.
campaign_rows = Table(
    "pepipost_campaign_rows",
    metadata,
    *_task_instance_columns(),
    Column("row_index", Integer, nullable=False),
    # accepted | fallback | rejected | unknown | duplicate | not_sent | suppressed
    Column("state", String(limits.LEDGER_STATE_MAX), nullable=False),
    Column("recipient", String(limits.RECIPIENT_MAX), nullable=False),
    Column("ledger_key", String(limits.IDEMPOTENCY_KEY_MAX), nullable=True),
    Column("message_id", String(limits.MESSAGE_ID_MAX), nullable=True),
    Column("error_code", String(limits.ERROR_CODE_MAX), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("campaign", String(limits.CAMPAIGN_HASH_MAX), nullable=True),
    Column("attempt", String(limits.ATTEMPT_MAX), nullable=True),  # the try that wrote it
    Column("updated_at", Float, nullable=False),
    # By run first: the page selects a run (or one task of it) by this key's prefix.
    PrimaryKeyConstraint("dag_id", "run_id", "task_id", "map_index", "row_index"),
)

# Every delivery event as it came, once: the key folds message id, status and reported time.
events = Table(
    "pepipost_events",
    metadata,
    Column("id", _EventId, primary_key=True, autoincrement=True),
    Column("event_key", String(limits.EVENT_KEY_MAX), nullable=False),
    Column("message_id", String(limits.MESSAGE_ID_MAX), nullable=False),
    Column("status", String(limits.STATUS_MAX), nullable=False),
    Column("raw_status", String(limits.RAW_STATUS_MAX), nullable=False),
    Column("remark", Text, nullable=False),
    Column("reported_at", Float, nullable=True),
    Column("received_at", Float, nullable=False),
    Column("api_header", String(limits.API_HEADER_MAX), nullable=True),
    Column("recipient", String(limits.RECIPIENT_MAX), nullable=True),
    Column("raw", Text, nullable=False),
    Index("ux_pepipost_events_key", "event_key", unique=True),
    Index("ix_pepipost_events_message_id", "message_id"),
)

# What the receiver could not read as a delivery report, kept with the reason instead of dropped.
dead_letters = Table(
    "pepipost_dead_letters",
    metadata,
    Column("id", _EventId, primary_key=True, autoincrement=True),
    Column("received_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("raw", Text, nullable=False),
    # v3: a hash of the body and the item's place in it, so that a body sent again adds no dead
    # letters. Rows from before v3 have none (NULLs never conflict).
    Column("letter_key", String(limits.EVENT_KEY_MAX), nullable=True),
    Index("ux_pepipost_dead_letters_key", "letter_key", unique=True),
)

# Customer replies (incoming_message[]) come to the same webhook; kept apart, never a status.
inbound_messages = Table(
    "pepipost_inbound_messages",
    metadata,
    Column("id", _EventId, primary_key=True, autoincrement=True),
    Column("inbound_key", String(limits.EVENT_KEY_MAX), nullable=False),
    Column("sender", String(limits.SENDER_MAX), nullable=True),
    Column("context_message_id", String(limits.MESSAGE_ID_MAX), nullable=True),
    Column("received_at", Float, nullable=False),
    Column("raw", Text, nullable=False),
    # v10: what each kind carries (status.inbound): its kind, the vendor's id of the message, the
    # text (of a text reply or a button; a media's caption), a button's payload, a media's id, a
    # location. NULL in rows stored before v10, whose raw holds it all.
    Column("kind", String(limits.INBOUND_KIND_MAX), nullable=True),
    Column("message_id", String(limits.MESSAGE_ID_MAX), nullable=True),
    Column("text", Text, nullable=True),
    Column("button_payload", String(limits.BUTTON_PAYLOAD_MAX), nullable=True),
    Column("media_id", String(limits.MEDIA_ID_MAX), nullable=True),
    Column("latitude", Float, nullable=True),
    Column("longitude", Float, nullable=True),
    Index("ux_pepipost_inbound_key", "inbound_key", unique=True),
    Index("ix_pepipost_inbound_context", "context_message_id"),
    # v11: on SQLite an id is never given again once its row is erased or purged (a reply feed's
    # cursor and the replies' claims name messages by id). PostgreSQL's sequence never gives one again.
    sqlite_autoincrement=True,
)

# v5: the suppression list, by canonical number (``numbers.canonical_number``). One row per number
# whose consent changed: opted out (a stop word in a reply, or a confirmed opt-out) or back in (a
# confirmed opt-in of a consent read before it changed). The send operators skip numbers whose row
# says opted_out.
suppressions = Table(
    "pepipost_suppressions",
    metadata,
    Column("recipient", String(limits.RECIPIENT_MAX), primary_key=True),
    Column("opted_out", Boolean, nullable=False),
    Column("changed_at", Float, nullable=False),
    Column("via", String(limits.LEDGER_STATE_MAX), nullable=False),  # reply | consent_api
    Column("detail", String(200), nullable=True),  # the reply's words, or the consent task
    # An opt-out taken from a reply, once the consent operator passed it on to the vendor.
    Column("synced_at", Float, nullable=True),
    # v7: raised by every change, so that a consent call records its outcome only where the row
    # still holds what it held when the call's rows were read (a STOP that came meanwhile wins).
    Column("revision", Integer, nullable=False, default=1, server_default="1"),
)

# v5: the consent calls each task instance made, by the hash of the batch: a retried consent task
# skips the ones the vendor confirmed.
# v9: facts about the store itself, one row each: the fingerprint of the erasure key its erased
# numbers were hashed with (``erasure_key_fingerprint``; "unknown" for erasures before v9).
store_settings = Table(
    "pepipost_store_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("updated_at", Float, nullable=False),
)

consent_batches = Table(
    "pepipost_consent_batches",
    metadata,
    Column("batch_key", String(limits.IDEMPOTENCY_KEY_MAX), primary_key=True),
    *_task_instance_columns(),
    Column("kind", String(limits.LEDGER_STATE_MAX), nullable=False),  # optin | optout
    Column("rows", Integer, nullable=False),
    # confirmed | refused; raced: a number of a confirmed opt-in that said STOP meanwhile (its own row)
    Column("state", String(limits.LEDGER_STATE_MAX), nullable=False),
    Column("error_code", String(limits.ERROR_CODE_MAX), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("updated_at", Float, nullable=False),
    Index("ix_pepipost_consent_batches_task", "dag_id", "run_id", "task_id", "map_index"),
)


# v11: where each reply feed (``WhatsAppReplyTrigger``'s stream) has got to: the last inbound
# message id whose events Airflow has stored. A feed starts at the newest message when it is made.
reply_cursors = Table(
    "pepipost_reply_cursors",
    metadata,
    Column("name", String(limits.REPLY_FEED_NAME_MAX), primary_key=True),
    Column("last_inbound_id", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Where the feed started: a sweep for replies whose events Airflow left unconsumed looks no further back.
    Column("first_inbound_id", BigInteger, nullable=False),
)

# v11: which DAG run took each reply for a consumer (``StatusStore.claim_replies``): the same reply
# delivered to several runs (a triggerer restart redelivers) is handled by the first one only.
reply_claims = Table(
    "pepipost_reply_claims",
    metadata,
    Column("consumer", String(limits.REPLY_FEED_NAME_MAX), nullable=False),
    Column("inbound_id", BigInteger, nullable=False),
    Column("dag_id", String(limits.AIRFLOW_ID_MAX), nullable=False),
    Column("run_id", String(limits.AIRFLOW_ID_MAX), nullable=False),
    Column("claimed_at", Float, nullable=False),
    PrimaryKeyConstraint("consumer", "inbound_id"),
)


# v12: approval requests sent on WhatsApp (``WhatsAppHITLNotifier``), one row per message: the
# human-in-the-loop task instance it asks for, its buttons (payload -> option, JSON) and who may
# answer (canonical numbers, JSON).
approval_requests = Table(
    "pepipost_approval_requests",
    metadata,
    Column("message_id", String(limits.MESSAGE_ID_MAX), primary_key=True),
    *_task_instance_columns(),
    Column("try_number", Integer, nullable=False),
    Column("options", Text, nullable=False),
    Column("approvers", Text, nullable=False),
    # The confirmation for the approver, JSON (template_name, language, pepipost_conn_id), or NULL.
    Column("confirmation", Text, nullable=True),
    Column("created_at", Float, nullable=False),
)

# v12: what became of each tap on an approval request: the verdict (answer, not_an_approver,
# unknown_payload), the option, what Airflow said (answered, already_answered, refused) and who
# tapped (masked). A tap without a row here is still to be handled; a row whose outcome is
# "submitting" was claimed by a receiver that is asking Airflow now (or died doing so: taken over
# once it is stale).
approval_answers = Table(
    "pepipost_approval_answers",
    metadata,
    Column("inbound_id", BigInteger, primary_key=True),
    Column("message_id", String(limits.MESSAGE_ID_MAX), nullable=False),
    Column("verdict", String(limits.LEDGER_STATE_MAX), nullable=False),
    Column("option", Text, nullable=True),
    Column("outcome", String(limits.LEDGER_STATE_MAX), nullable=True),
    Column("answered_by", String(limits.RECIPIENT_MAX), nullable=True),  # masked
    Column("detail", Text, nullable=True),
    Column("decided_at", Float, nullable=False),
    Index("ix_pepipost_approval_answers_message", "message_id"),
)

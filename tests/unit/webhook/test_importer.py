"""`pepipost-webhook import FILE`: reports kept elsewhere go through the receiver's checks into the store."""

from __future__ import annotations

import json

from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.cli import main
from tests.store_reads import current_status, dead_letters


def report(message_id: str, status: str, at: int = 1_700_000_000) -> dict:
    return {"ncmessage_id": message_id, "recipient": "919999999999", "status": status, "received_at": str(at)}


def test_a_jsonl_file_is_stored_like_posted_reports_and_can_be_loaded_twice(tmp_path, store_url, capsys):
    lines = [
        json.dumps(report("f1", "delivered")),
        json.dumps({"delivery_status": [report("f2", "read"), report("f1", "read", 1_700_000_100)]}),
        "{not json",
        json.dumps(report("f4", "failed")),
        "",
        '{"ncmessage_id": "f3", "status": "read", "note": "\\ud800"}',  # a lone surrogate: a dead letter
    ]
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(lines) + "\n")

    main(["import", str(path), "--store-url", store_url])
    first = json.loads(capsys.readouterr().out)
    assert (first["lines"], first["accepted"], first["dead_letters"], first["duplicates"]) == (5, 4, 2, 0)
    store = StatusStore(store_url)
    assert [current_status(store, m) for m in ("f1", "f2", "f3", "f4")] == ["read", "read", None, "failed"]
    reasons = sorted(reason for reason, _ in dead_letters(store))
    assert reasons[0].startswith("line 3: not JSON") and "line 6: item contains a lone surrogate" in reasons[1]

    main(["import", str(path), "--store-url", store_url])  # loaded again: nothing new
    again = json.loads(capsys.readouterr().out)
    assert (again["accepted"], again["duplicates"]) == (0, 4)
    assert store.count_rows("pepipost_events") == 4 and store.count_rows("pepipost_dead_letters") == 2

"""One vocabulary: each word the XCom, the page, its CSV and the sensor use is defined once, and
the docs (the campaign page's, where the words are listed) and the page's legend say exactly that."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_pepipost.operators.campaign import PROGRESS_STATES
from airflow_provider_pepipost.plugins.campaign_html import render_page
from airflow_provider_pepipost.status.model import DELIVERY_STATUS_MEANINGS, TASK_STATE_MEANINGS
from airflow_provider_pepipost.status.reports import DELIVERY_STATUSES, TASK_STATES, CampaignReport

DOCS_PAGE = (Path(__file__).resolve().parents[2] / "docs" / "campaign-page.md").read_text()


def test_the_docs_define_every_word_as_the_code_does():
    for word, meaning in (*TASK_STATE_MEANINGS.items(), *DELIVERY_STATUS_MEANINGS.items()):
        assert f"- `{word}`: {meaning}\n" in DOCS_PAGE, word


def test_the_states_and_statuses_are_the_defined_ones_everywhere():
    assert tuple(TASK_STATE_MEANINGS) == TASK_STATES == tuple(state for state, _ in PROGRESS_STATES)
    assert tuple(DELIVERY_STATUS_MEANINGS) == DELIVERY_STATUSES


def test_the_page_legend_says_the_same():
    page = render_page(CampaignReport(tasks=1), title="t", scope="s", csv_url="/x.csv")
    for meaning in (*TASK_STATE_MEANINGS.values(), *DELIVERY_STATUS_MEANINGS.values()):
        assert meaning.replace("'", "&#x27;") in page, meaning

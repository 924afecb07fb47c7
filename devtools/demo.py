"""``make demo``: the example campaign DAG end to end on this machine, without a Pepipost account.

A development tool of this repository, not part of the installed provider.

Starts the sandbox and the webhook receiver on free loopback ports, migrates a throwaway Airflow
database, runs ``airflow dags test``, then prints the delivery funnel next to what the sandbox's
scenario decided. Everything it started is stopped on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import requests

from airflow_provider_pepipost.operators.links import campaign_page_path
from airflow_provider_pepipost.status.store import StatusStore
from devtools.processes import free_port, wait_http

DEMO_SCENARIO = {
    "seed": 11,
    "latency": 0.05,
    "final_mix": {"read": 0.6, "delivered": 0.25, "sent": 0.05, "failed": 0.1},
    "status_delay": 0.3,
    "duplicate_ratio": 0.1,
    "out_of_order_ratio": 0.1,
    "inbound_ratio": 0.1,
    "reject_ratio": {"8003": 0.03},
    "closed_window_ratio": 0.3,  # they get the approved template instead of the session message
    "rate_429": 0.03,
    "retry_after": 0.2,
    "webhook_version": 2,
}


def sandbox_funnel(final_by_status: dict[str, int]) -> dict[str, int]:
    counts = Counter(final_by_status)
    return {
        "total": sum(counts.values()),
        "sent": counts["sent"] + counts["delivered"] + counts["read"],
        "delivered": counts["delivered"] + counts["read"],
        "read": counts["read"],
        "failed": counts["failed"],
    }


def store_funnel(store_url: str, dag_id: str) -> dict[str, int]:
    """The funnel of every message the DAG sent, read through the status store's API."""
    store = StatusStore(store_url)
    summary = store.summarize(store.task_keys(dag_id))
    funnel = sandbox_funnel(summary.counts)
    funnel["total"] += summary.pending + summary.unknown
    funnel["pending"] = summary.pending  # the words of status.model.DELIVERY_STATUSES: no report yet
    funnel["unknown"] = summary.unknown  # the send's own outcome unknown, no report matched it yet
    return funnel


def print_page_url(store_url: str, dag_id: str, workdir: Path) -> None:
    """How to open this run's campaign page: the API server of the demo's Airflow home serves it."""
    keys = StatusStore(store_url).task_keys(dag_id)
    if not keys:
        return
    path = campaign_page_path(dag_id, keys[-1].run_id)
    print(
        "[demo] The campaign page of this run, served by Airflow's API server (sign in as admin; the\n"
        "       password is in simple_auth_manager_passwords.json.generated under AIRFLOW_HOME):\n"
        f"         AIRFLOW_HOME={workdir / 'airflow'} PEPIPOST_STATUS_STORE_URL={store_url} \\\n"
        f"           {Path(sys.executable).parent / 'airflow'} api-server --port 8080\n"
        f"         then open http://localhost:8080{path}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pepipost-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dags-folder", default="dags_examples")
    parser.add_argument("--dag", default="whatsapp_template_campaign")
    parser.add_argument("--workdir", default=".demo")
    parser.add_argument("--audience-size", type=int, default=200)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "airflow").mkdir(parents=True)
    store_path = workdir / "pepipost_status.db"
    store_url = f"sqlite:///{store_path}"
    token = secrets.token_urlsafe(24)
    sandbox_port, webhook_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    webhook_url = f"http://127.0.0.1:{webhook_port}/pepipost/webhook"
    bin_dir = Path(sys.executable).parent

    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(workdir / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(args.dags_folder).resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PEPIPOST_STATUS_STORE_URL": store_url,
            "PEPIPOST_WEBHOOK_TOKEN": token,
            "AIRFLOW_CONN_PEPIPOST_DEFAULT": json.dumps(
                {
                    "conn_type": "pepipost",
                    "host": sandbox_url,
                    "password": "sandbox-api-key",
                    "extra": {"source": "sandbox-source"},
                }
            ),
        }
    )
    children: list[subprocess.Popen] = []

    def stop_children(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"[demo] migrating a throwaway Airflow database in {workdir / 'airflow'}", flush=True)
        subprocess.run([str(bin_dir / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        children.append(subprocess.Popen([str(bin_dir / "pepipost-webhook"), "--port", str(webhook_port)], env=env))
        sandbox_command = [str(bin_dir / "pepipost-sandbox"), "--port", str(sandbox_port)]
        sandbox_command += ["--webhook-url", webhook_url, "--scenario", json.dumps(DEMO_SCENARIO)]
        children.append(subprocess.Popen(sandbox_command, env=env))
        wait_http(f"http://127.0.0.1:{webhook_port}/pepipost/healthz")
        wait_http(f"{sandbox_url}/_sandbox/stats")
        print(f"[demo] sandbox {sandbox_url}, receiver {webhook_url}; running airflow dags test {args.dag}", flush=True)
        conf = json.dumps({"audience_size": args.audience_size})
        run = subprocess.run(
            [str(bin_dir / "airflow"), "dags", "test", args.dag, "--conf", conf], env=env, timeout=1800
        )
        if run.returncode != 0:
            print(f"[demo] airflow dags test failed with exit code {run.returncode}", flush=True)
            return run.returncode

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the last delivery reports may still be on their way
            stats = requests.get(f"{sandbox_url}/_sandbox/stats", timeout=5).json()
            if stats["reports"]["pending"] == 0:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        stats = requests.get(f"{sandbox_url}/_sandbox/stats", timeout=5).json()
        expected = sandbox_funnel(stats["funnel"])
        got = store_funnel(store_url, args.dag)
        print("\n[demo] Delivery funnel: status store (from webhook reports) vs the sandbox's scenario")
        print(f"  {'stage':<10}{'store':>8}{'sandbox':>9}")
        for stage in ("total", "sent", "delivered", "read", "failed"):
            print(f"  {stage:<10}{got[stage]:>8}{expected[stage]:>9}")
        print(f"  {'pending':<10}{got['pending']:>8}")
        print(f"  {'unknown':<10}{got['unknown']:>8}")
        by_type = stats.get("accepted_by_type", {})
        print(
            f"  sent as session (media) messages: {by_type.get('media', 0)}; as the approved template, where "
            f"the 24-hour window was closed: {by_type.get('template', 0)}"
        )
        print(
            f"  sandbox: {stats['requests']} requests, {stats['accepted']} accepted, responses {stats['responses']}, "
            f"{stats['reports']['events_posted']} report events posted"
        )
        matches = all(got[k] == expected[k] for k in expected)
        print(f"[demo] funnel matches the sandbox scenario: {'yes' if matches else 'NO'}", flush=True)
        print_page_url(store_url, args.dag, workdir)
        return 0 if matches else 1
    except KeyboardInterrupt:
        print("[demo] interrupted", flush=True)
        return 130
    finally:
        stop_children()


if __name__ == "__main__":
    sys.exit(main())

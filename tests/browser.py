"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API, with requests only.

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them). Enough for the
browser tests: open a URL, set a cookie, read the rendered DOM (of the page or of a frame in it),
take a screenshot.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.helpers import free_port, wait_until

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when the machine has no such pair."""
    driver = shutil.which("chromedriver")
    browser = next((path for path in CHROMIUM_CANDIDATES if Path(path).exists()), None)
    return (browser, driver) if browser and driver else None


class Browser:
    """One WebDriver session of a headless Chromium."""

    def __init__(self, chromium: str, chromedriver: str, log: Path) -> None:
        self.port = free_port()
        self._log = log.open("ab")
        self._driver = subprocess.Popen(
            [chromedriver, f"--port={self.port}"], stdout=self._log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{self.port}"
        if not wait_until(lambda: _up(f"{self.base}/status"), timeout=20):
            self.close()
            raise RuntimeError(f"chromedriver did not start; see {log}")
        options = {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1600"],
        }
        answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.session = f"/session/{answer['sessionId']}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(method, self.base + path, json=body, timeout=60)
        value = response.json().get("value")
        if response.status_code >= 400:
            raise RuntimeError(f"WebDriver {method} {path}: {value}")
        return value

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def add_cookie(self, name: str, value: str) -> None:
        """On the site of the page open now."""
        self._call("POST", f"{self.session}/cookie", {"cookie": {"name": name, "value": value, "path": "/"}})

    def source(self) -> str:
        return self._call("GET", f"{self.session}/source")

    def text_of(self, css: str) -> str:
        element = self._call("POST", f"{self.session}/element", {"using": "css selector", "value": css})
        element_id = next(iter(element.values()))
        return self._call("GET", f"{self.session}/element/{element_id}/text")

    def find(self, css: str) -> dict[str, str] | None:
        """The first element matching ``css`` (a WebDriver element reference), or None."""
        found = self._call("POST", f"{self.session}/elements", {"using": "css selector", "value": css})
        return found[0] if found else None

    def attribute(self, element: dict[str, str], name: str) -> str | None:
        return self._call("GET", f"{self.session}/element/{next(iter(element.values()))}/attribute/{name}")

    def enter_frame(self, element: dict[str, str] | None) -> None:
        """Read the DOM of this iframe from now on; None: the top page again."""
        self._call("POST", f"{self.session}/frame", {"id": element})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))

    def close(self) -> None:
        try:
            if hasattr(self, "session"):
                self._call("DELETE", self.session)
        finally:
            self._driver.terminate()
            self._driver.wait(timeout=10)
            self._log.close()


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False

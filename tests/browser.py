"""Headless Chromium for tests, driven through ChromeDriver's W3C WebDriver HTTP API (no extra package).

``headless_chromium()`` yields a :class:`Browser`, or calls ``pytest.skip`` with the reason when Debian's
``chromium`` / ``chromedriver`` are not installed (.ci/run installs them where apt-get works).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

# Flags for a sandboxed, offline machine: without the background-networking ones Chromium keeps trying
# (and failing) to reach Google's services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def _binary(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One WebDriver session."""

    def __init__(self, base: str, session: str):
        self.base = f"{base}/session/{session}"

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.read().decode(errors='replace')[:500]}") from None

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self._call("POST", "/url", {"url": url})

    def run(self, script: str, *args):
        """The value of a JavaScript function body run in the page (``return ...``)."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        """A real click on the first element matching ``css``."""
        element = self._call("POST", "/element", {"using": "css selector", "value": css})
        self._call("POST", f"/element/{next(iter(element.values()))}/click")

    def resize(self, width: int, height: int) -> None:
        """Set the window size (a taller window shows more of the page in one screenshot)."""
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self) -> bytes:
        """PNG of the viewport."""
        return base64.b64decode(self._call("GET", "/screenshot"))

    def console_errors(self) -> list[dict]:
        """Browser log entries of level SEVERE (console errors, failed loads, uncaught exceptions)."""
        entries = self._call("POST", "/se/log", {"type": "browser"})
        return [e for e in entries if e.get("level") == "SEVERE"]


@contextlib.contextmanager
def headless_chromium():
    """A :class:`Browser` on a fresh ChromeDriver + headless Chromium; skips with the reason if unavailable."""
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver = _binary("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        print(f"SKIP: {missing} not installed (apt-get install chromium chromium-driver)")
        pytest.skip(f"{missing} not installed (Debian: apt-get install chromium chromium-driver)")
    port = _free_port()
    process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    session = None
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "/status", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        capabilities = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        }
        request = urllib.request.Request(
            base + "/session",
            data=json.dumps(capabilities).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                session = json.loads(response.read())["value"]["sessionId"]
        except (OSError, KeyError) as err:
            print(f"SKIP: headless Chromium did not start: {err}")
            pytest.skip(f"headless Chromium did not start: {err}")
        yield Browser(base, session)
    finally:
        if session is not None:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(urllib.request.Request(f"{base}/session/{session}", method="DELETE"), timeout=10)
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)

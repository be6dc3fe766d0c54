"""Fixtures for the browser tests: a private JupyterLab server and a headless Debian Chromium.

The browser tests run only when asked for (``pytest -m browser tests/browser``); a plain ``pytest``
skips them, because they need ``/usr/bin/chromium`` (``apt-get install chromium``) and the
``playwright`` package, and take minutes. Playwright's own browser download is not used: it needs
the network, so Playwright drives the system Chromium through ``executable_path``.

The server runs on 127.0.0.1 with a random token, with every Jupyter directory (config, data,
runtime, lab settings, workspaces) in a temporary folder, on *copies* of the chapters: Run All in the
browser must never rewrite the committed notebooks or the committed ``figures/`` (the chapters save
figures under ``$DETR_EDU_ROOT/figures``, which points into the temporary copy). The other top-level
entries (``benchmarks/`` whose results some chapters read, ...) are symlinked into the copy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT_DIR = ROOT / "test-output" / "browser"  # screenshots and the widget summary (gitignored)

# JupyterLab user settings for a test run. windowingMode "none": JupyterLab 4 otherwise renders only
# the cells in view, and widgets further down would not be in the page at all. No autosave, no news
# or update checks (no network here, and no pop-ups over the cells).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _browser_selected(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return "browser" in markexpr and "not browser" not in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip browser tests unless the run selects them with ``-m browser``."""
    if _browser_selected(config):
        return
    skip = pytest.mark.skip(reason="browser test: run with `pytest -m browser tests/browser`")
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(skip)


def chapters() -> list[Path]:
    """Every chapter notebook, in course order."""
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@dataclass
class Lab:
    """A running JupyterLab: where it is and how to reach it."""

    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the server's root folder (holds notebooks/ and figures/ copies)
    log: Path

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Delete every session and kernel (frees the CPU between chapters)."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1 with a token and temporary Jupyter dirs; always stopped afterwards."""
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "course"
    (root / "notebooks").mkdir(parents=True)
    for notebook in chapters():
        shutil.copy2(notebook, root / "notebooks" / notebook.name)
    shutil.copytree(ROOT / "figures", root / "figures")  # markdown images like ../figures/x.png
    # The rest of the course (benchmarks/results the chapters quote, ...) is linked, read-only use.
    for entry in ROOT.iterdir():
        if entry.name not in {"notebooks", "figures", "build", "test-output"} and not entry.name.startswith(
            "."
        ):
            (root / entry.name).symlink_to(entry)
    settings = base / "lab-settings"
    for name, value in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))

    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
        DETR_EDU_ROOT=str(root),
        PYTHONHASHSEED="0",
    )
    env.pop("MPLBACKEND", None)  # the chapters use %matplotlib inline
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=",
        "--LabApp.extension_manager=readonly",  # no PyPI look-ups (no network here)
        "--ServerApp.terminals_enabled=False",
    ]
    if os.geteuid() == 0:  # CI containers run as root
        command.append("--allow-root")
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                server.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in 90 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield server
    finally:
        try:
            server.shutdown_kernels()
        except Exception:  # noqa: BLE001 - the server may already be gone; stop it below anyway
            pass
        # The server and its kernels share one process group (start_new_session): stop them all.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: object, lab: Lab) -> Iterator[object]:
    """A fresh browser page (own context: no state shared between chapters)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
        lab.shutdown_kernels()


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR

"""Screenshot of a dashboard: start ``evidently ui`` on the workspace, open the project in
headless Chromium, save a PNG, stop the server. Used by the dashboard test and by hand::

    python -m monitoring.screenshot --out dashboard.png [--tab "Per content type"]

Chromium is Debian's ``chromium`` package; ``find_chromium()`` returns None when it is absent.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from hap.core.config import Config, load_config
from monitoring import dashboards

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.3)


def screenshot(
    cfg: Config,
    out: Path,
    tab: str | None = None,
    width: int = 1400,
    height: int = 2200,
    timeout: float = 60.0,
) -> Path:
    """Serve the workspace, capture the project's dashboard (optionally one tab), stop the server."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    _, project = dashboards.refresh(cfg)
    port = free_port()
    server = subprocess.Popen(
        dashboards.ui_command(cfg, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/projects", timeout)
        url = dashboards.project_url(cfg, project, port)
        if tab:
            url += f"?tab={_tab_id(cfg, project, tab)}"
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return out
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _tab_id(cfg: Config, project, tab: str) -> str:  # noqa: ANN001
    model = project.dashboard.model()
    for t in model.tabs:
        if t.title == tab:
            return str(t.id)
    raise KeyError(f"no dashboard tab '{tab}'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tab", default=None)
    args = parser.parse_args()
    print(screenshot(load_config(), args.out, args.tab))


if __name__ == "__main__":
    main()

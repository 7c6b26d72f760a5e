"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against `streamlit run dashboard/app.py` and a real control plane with real data: every page
loads with its charts, a pending plan is approved through the UI, the audit log shows it.
Screenshots: test-output/dashboard/<page>.png. No request may leave localhost."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import sync_playwright

from headroom_sidecar.proto.client import AdminClient, reply_json
from tests.controlplane.loopkit import wait_for
from tests.dashboard.kit import AGENT, APP, free_port, pending_plan

pytestmark = pytest.mark.timeout(150)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
OPERATOR = "frank"
TIMEOUT_MS = 30_000


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def dashboard(world):
    """`streamlit run` on a free port, as `make dashboard` starts it; its base URL."""
    port = free_port()
    env = {**os.environ, "HEADROOM_OPERATOR": "", "HEADROOM_ADDRESS": ""}
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "viewer",
           "--", "--address", world.address, "--operator", OPERATOR]
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "streamlit.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=APP.parents[1])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(f"{base}/_stcore/health") or proc.poll() is not None, 30,
                 "streamlit health")
        assert proc.poll() is None, (SHOTS / "streamlit.log").read_text()
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def browser_page():
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def _offsite_guard(page) -> list[str]:
    """Aborts and records every request that is not to localhost (a CDN would show here)."""
    offsite = []

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            offsite.append(r.request.url)
            r.abort()
    page.route("**/*", route)
    return offsite


def _open(page, base: str, path: str, *texts: str) -> None:
    page.goto(f"{base}/{path}")
    for text in texts:
        page.get_by_text(text, exact=False).first.wait_for()
    _settled(page)


_SETTLED_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return app && app.dataset.testScriptState === 'notRunning'
      && !document.querySelector('[data-testid^="stSkeleton"]');
}"""


def _settled(page) -> None:
    """Until the script run is over and no element still shows its loading skeleton."""
    page.wait_for_function(_SETTLED_JS)
    page.wait_for_load_state("networkidle")
    time.sleep(0.5)      # Vega draws after the element mounts


def _shot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main element, so grow the viewport to it."""
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], height)})
    _settled(page)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def test_every_page_then_approve_in_the_browser(world, dashboard, browser_page):
    page, base = browser_page, dashboard
    plan_id = pending_plan(world.address)
    offsite = _offsite_guard(page)
    t0 = time.monotonic()

    _open(page, base, "", "Fleet", AGENT, "healthy")      # the default page lives at /
    _shot(page, "fleet")
    _open(page, base, "internals", "Model internals", "Attention entropy")
    page.locator(".vega-embed").nth(4).wait_for()
    assert page.locator(".vega-embed").count() == 5
    _shot(page, "internals")
    _open(page, base, f"decisions?plan={world.history_plan}", "Policy evaluation",
          "Rollout history", "Rollbacks")
    _shot(page, "decisions")

    _open(page, base, "approvals", "Approvals", plan_id, f"operator:{OPERATOR}")
    _shot(page, "approvals")
    card = page.locator("[data-testid='stForm']").filter(has=page.get_by_role("button",
                                                                              name="Approve")).first
    card.get_by_label("reason (recorded in the audit log)").fill("approved in the browser test")
    card.get_by_role("button", name="Approve").click()
    page.get_by_text(f"Approved {plan_id} as operator:{OPERATOR}").wait_for()
    _settled(page)
    _shot(page, "approvals-after")

    _open(page, base, "audit", "Audit log", "Chain verified")
    page.get_by_label("actor (e.g. operator:alice)").fill(f"operator:{OPERATOR}")
    page.get_by_label("actor (e.g. operator:alice)").press("Enter")
    page.get_by_text(f"APPROVED by operator:{OPERATOR}").wait_for()
    _settled(page)
    _shot(page, "audit")
    elapsed_s = time.monotonic() - t0

    with AdminClient(world.address) as admin:
        (row,) = reply_json(admin.list_audit(subject=plan_id, kind="APPROVED"))
        assert (row["actor"], row["details"]["reason"]) == (f"operator:{OPERATOR}",
                                                           "approved in the browser test")
        wait_for(lambda: admin.show_plan(plan_id).plan.status
                 not in ("approved", "applying"), 30, "rollout")
        if admin.show_plan(plan_id).plan.status == "applied":
            admin.rollback_plan(plan_id, "browser test cleanup", actor="cleanup")
    assert not offsite, f"requests left localhost: {offsite}"
    assert elapsed_s < 90, f"the browser walk took {elapsed_s:.0f} s"

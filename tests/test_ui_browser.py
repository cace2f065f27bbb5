"""The operator page in a real headless Chromium (Debian's ``chromium`` and ``chromedriver``).

The sidecar's app is served over loopback HTTP by werkzeug in a thread;
Selenium drives the browser through the page as an operator would: sign in
through the form, read the page, press Replay on a dead letter, see the
result. Screenshots go to ``test-artifacts/`` (``ui.png``: the signed-in page).

Skipped, with the reason, where Chromium, its driver or Selenium is missing;
CI (``.ci/run``) sets BIZPLUGIN_REQUIRE_BROWSER, which makes that a failure.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from conftest import REPO
from test_delivery import APPS, USERS
from test_ui import EVIL, TOKEN, OperatorSidecar
from openim_bizplugin.testing import FakeOpenIM

ARTIFACTS = REPO / "test-artifacts"
WAIT_SECONDS = 15
# The machine may have no network: without the background-networking flags
# Chromium keeps trying (and logging) connections to Google's services.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


def _browser_or_skip() -> tuple[str, str]:
    """The chromium and chromedriver binaries, once Selenium imports; else skip (or fail in CI)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        reason = f"no real browser to test the operator page with: {', '.join(missing)} missing" \
                 " (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("BIZPLUGIN_REQUIRE_BROWSER"):  # CI: a missing browser is a failure, not a skip
            pytest.fail(reason + ", and BIZPLUGIN_REQUIRE_BROWSER is set")
        pytest.skip(reason)
    return chromium, driver  # type: ignore[return-value]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # both paths given: Selenium Manager has nothing to download
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=USERS, online=APPS) as im:
        yield im


@pytest.fixture
def side(tmp_path: Path, fake: FakeOpenIM, clock: Any) -> Iterator[OperatorSidecar]:
    sidecar = OperatorSidecar(tmp_path, fake, clock)
    yield sidecar
    sidecar.services.close()


@pytest.fixture
def served(side: OperatorSidecar) -> Iterator[str]:
    """The sidecar's app on a free loopback port; yields its base URL."""
    server = make_server("127.0.0.1", 0, side.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="ui-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def screenshot(driver: Any, name: str) -> Path:
    """The whole page, not only the window, as a PNG in test-artifacts/ (by the DevTools protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 10_000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def test_an_operator_signs_in_reads_the_page_and_replays_a_dead_letter(browser, side, served):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    evil = side.send(mode="custom", to={"users": [EVIL]})  # fails: no such user in OpenIM
    ids = side.seed()
    wait = WebDriverWait(browser, WAIT_SECONDS)

    browser.get(served + "/ui")
    assert browser.title.startswith("Sign in") and browser.get_cookies() == []
    browser.find_element(By.NAME, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    error = wait.until(until.visibility_of_element_located((By.CSS_SELECTOR, "[role=alert]")))
    assert error.text == "That is not the operator token." and browser.get_cookies() == []

    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(until.presence_of_element_located((By.ID, "dead-letters")))
    assert browser.title.startswith("Overview")
    [cookie] = browser.get_cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/ui")
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: page scripts cannot read it

    queue = browser.find_element(By.ID, "queue").text.split()
    assert queue[queue.index("high") - 1] == "1" and queue[queue.index("total") - 1] == "1"
    presence = browser.find_element(By.ID, "presence").text.split()
    assert presence[presence.index("online") - 1] == "1" and presence[presence.index("offline") - 1] == "1"
    delivered = browser.find_element(By.CSS_SELECTOR, f'details[data-message="{ids["delivered"]}"]')
    assert "2 sent" in delivered.text
    failures = browser.find_element(By.ID, "failures").text
    assert "user ghost" in failures and f"user {EVIL}" in failures  # the id shown as text, not markup
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - nothing from the recipient id ran
    dead_letters = browser.find_element(By.ID, "dead-letters")
    assert ids["dead"] in dead_letters.text and evil in dead_letters.text
    assert screenshot(browser, "ui.png").stat().st_size > 10_000

    dead_letters.find_element(By.CSS_SELECTOR, f'button[aria-label="Replay {ids["dead"]}"]').click()
    flash = wait.until(until.visibility_of_element_located((By.CSS_SELECTOR, ".flash")))
    assert flash.text == f"Replayed message {ids['dead']}: 1 recipient(s) queued again."
    assert browser.current_url == served + "/ui#dead-letters"
    assert ids["dead"] not in browser.find_element(By.ID, "dead-letters").text
    assert [r["status"] for r in side.recipients(ids["dead"])] == ["queued", "sent"]
    screenshot(browser, "ui-replayed.png")

    browser.find_element(By.CSS_SELECTOR, "header button[type=submit]").click()  # sign out
    wait.until(until.presence_of_element_located((By.NAME, "token")))
    browser.get(served + "/ui")
    assert browser.find_elements(By.ID, "dead-letters") == []

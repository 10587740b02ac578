"""The dashboard in headless Chromium (Selenium and Debian's `chromium` + `chromium-driver`),
on a swarm of its own: `swarm dht --dashboard 0` and three peers of the default model
(blocks 0:10, 10:20, 20:30; this module kills one, so the session's `swarm` stays untouched).
The page must show 30 covered blocks and 3 peers, turn a killed peer's blocks into a gap
without a reload, and, served by `swarm api`, answer through its chat box."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from peer.announcer import RECORD_LIFETIME_PERIODS
from swarm.dashboard.watch import SAMPLE_PERIOD
from tests.integration.conftest import DHT_LINE, SwarmProcs
from tests.procs import REPO_ROOT, output, spawn, stop, unused_port, wait_for_line

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
API_CLI = REPO_ROOT / "client" / "apps" / "api" / "cli.py"
ANNOUNCE_PERIOD = 2.0  # s: records live 3 periods, so a killed peer's blocks go within 6 s
SPANS = ["0:10", "10:20", "20:30"]
PAGE_POLL = 2.0  # s, POLL_MS in dashboard.js
# The page sees a record gone one DHT read and one poll after it expired.
GONE_WITHIN = RECORD_LIFETIME_PERIODS * ANNOUNCE_PERIOD + SAMPLE_PERIOD + PAGE_POLL + 2.0

# What the page shows, read in the page: the first model's blocks, gaps and peer rows.
SHOWN = """
const m = document.querySelector('.model');
if (!m) return null;
return {covered: m.querySelectorAll('.block.covered').length, blocks: m.querySelectorAll('.block').length,
        gaps: [...m.querySelectorAll('.block.gap')].map((b) => Number(b.dataset.index)),
        peers: m.querySelectorAll('tr.peer').length, summary: m.querySelector('.summary').textContent};
"""


@pytest.fixture(scope="module")
def dashboard_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    procs = SwarmProcs(tmp_path_factory.mktemp("dashboard-swarm"), initial_peers=[])
    try:
        dht = procs.spawn(["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1", "--dashboard", "0"])
        procs.initial_peers = [wait_for_line(dht, DHT_LINE, timeout=30).group(0)]
        url = wait_for_line(dht, r"dashboard at (http://\S+)", timeout=30).group(1)
        peers = [procs.start_peer("--blocks", span, "--announce-period", str(ANNOUNCE_PERIOD), "--threads", "1",
                                  "--decode-threads", "1") for span in SPANS]
        api_url = None
        if API_CLI.exists():  # joins while the peers load
            port = unused_port()
            procs.spawn(["python", "-m", "client.apps.api.cli", "--initial-peers", procs.initial_peers[0],
                         "--host", "127.0.0.1", "--port", str(port)])
            api_url = f"http://127.0.0.1:{port}/"
        for peer in peers:
            peer.wait_ready()
        yield SimpleNamespace(url=url, api_url=api_url, peers=dict(zip(SPANS, peers)))
    finally:
        procs.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_shown(driver, condition, timeout: float, what: str) -> dict:
    """Polls what the page shows until `condition(shown)` holds; fails naming `what` and the last seen."""
    deadline, shown = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        shown = driver.execute_script(SHOWN)
        if shown and condition(shown):
            return shown
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; the page shows {shown}")


def assert_not_blank(path: Path) -> None:
    assert path.stat().st_size > 10_000, f"{path} is {path.stat().st_size} bytes: blank?"
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 50, f"{path} has {len(colours)} colours: blank?"


def test_chat_box_answers_through_the_api(dashboard_swarm, browser):
    if dashboard_swarm.api_url is None:
        pytest.skip(f"`swarm api` is not in this tree yet ({API_CLI.relative_to(REPO_ROOT)} is missing)")
    deadline = time.monotonic() + 90
    while True:  # the API loads the client's parts of the model before it answers
        try:
            urllib.request.urlopen(dashboard_swarm.api_url + "swarm.json", timeout=5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    browser.get(dashboard_swarm.api_url)
    wait_shown(browser, lambda s: s["covered"] == 30, 30, "the API's dashboard shows the model covered")
    from selenium.webdriver.common.by import By

    ask = browser.find_element(By.ID, "chat-input")
    assert ask.is_enabled() and not browser.find_element(By.ID, "chat-off").is_displayed()
    maximum = browser.find_element(By.ID, "chat-max")
    maximum.clear()
    maximum.send_keys("12")
    ask.send_keys("What is the capital of France?")
    browser.find_element(By.ID, "chat-send").click()
    deadline = time.monotonic() + 90
    while not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done, .msg.assistant.failed"):
        assert time.monotonic() < deadline, "no answer in the chat box within 90 s"
        time.sleep(0.2)
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert "failed" not in answer.get_attribute("class"), answer.text
    assert answer.text.strip() and answer.text != "\u2026"


def test_page_shows_coverage_and_peers_and_a_killed_peer_s_gap(dashboard_swarm, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(dashboard_swarm.url)
    shown = wait_shown(browser, lambda s: s["covered"] == 30 and s["peers"] == 3, 20, "30 covered blocks, 3 peers")
    assert shown["blocks"] == 30 and shown["gaps"] == [] and "30 / 30 blocks covered" in shown["summary"]
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "tr.peer")]
    for span, peer in dashboard_swarm.peers.items():
        assert any(peer.endpoint in row and span in row and "direct" in row for row in rows), (span, rows)
    # No API behind `swarm dht --dashboard`: the chat box is off and says why.
    assert not browser.find_element(By.ID, "chat-input").is_enabled()
    assert "swarm dht --dashboard" in browser.find_element(By.ID, "chat-off").text
    time.sleep(1.0)  # the plot is drawn on the next animation frame
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert_not_blank(screenshot)
    if os.environ.get("SWARMLM_DASHBOARD_SCREENSHOT"):  # `docs/dashboard.png` is made this way
        shutil.copy(screenshot, os.environ["SWARMLM_DASHBOARD_SCREENSHOT"])

    killed = dashboard_swarm.peers["10:20"]
    os.killpg(killed.proc.pid, signal.SIGKILL)  # the peer and its DHT process: no withdrawal, records expire
    killed_at = time.monotonic()
    shown = wait_shown(browser, lambda s: s["gaps"] == list(range(10, 20)), GONE_WITHIN,
                       "the killed peer's blocks 10-19 shown uncovered")
    assert shown["covered"] == 20 and shown["peers"] == 2 and "uncovered: 10\u201319" in shown["summary"]
    print(f"blocks shown uncovered {time.monotonic() - killed_at:.1f} s after the kill "
          f"(records live {RECORD_LIFETIME_PERIODS * ANNOUNCE_PERIOD:g} s)")


def test_a_dashboard_port_in_use_is_one_line_and_exit_code_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn(["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1", "--dashboard", str(port)],
                     log_dir=tmp_path)
        try:
            assert proc.wait(timeout=60) == 1, output(proc)
        finally:
            stop(proc)
    errors = proc.stderr_path.read_text()
    assert f"swarm dht: error: --dashboard {port}: the dashboard cannot listen on 127.0.0.1:{port}" in errors
    assert "Traceback" not in errors

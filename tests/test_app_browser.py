"""The app in a real browser: `python -m app` on the demo model, driven by Playwright in headless Chromium.

Needs Debian's Chromium (`apt-get install -y chromium`) and `pip install playwright` (Playwright's own
browser download does not work here; it drives /usr/bin/chromium). Skipped, with that reason, only
when /usr/bin/chromium is absent. Leaves a screenshot of each state in tests/artifacts/app-*.png to look at:
a finished run, the live preview, the busy Generate button, a queued second window, cancel while
denoising and while decoding, and the error states (none of which may leave a red "Error" badge).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
RUN_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(tmp_path_factory, program: list[str], outputs: Path):
    """Runs `python PROGRAM --port P --outputs OUTPUTS ...` on the demo model until the block ends; yields its url."""
    cache = tmp_path_factory.mktemp("cache")
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, *program, "--port", str(port), "--outputs", str(outputs),
                             "--cache-dir", str(cache), "--device", "cpu"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"python {' '.join(program)} exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < end, "the app did not answer within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m app` on the demo model; yields (url, outputs folder)."""
    outputs = tmp_path_factory.mktemp("outputs")
    with app_server(tmp_path_factory, ["-m", "app"], outputs) as url:
        yield url, outputs


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url):
    """A page in its own browser context (its own gradio session)."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("#generate")
    wait_status(page, "^Ready", timeout=60_000)  # the remembered settings have been loaded into the controls
    return page


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def fill_kept(page, box, text: str) -> None:
    """Fill `box` and check, two animation frames later, that the page kept the text; fill again if not. A tab's
    fields are mounted on its first click, and on a loaded CI machine the page's own first update of a new
    field can land after Playwright's fill and empty it (an Enter then sent an empty folder)."""
    for _ in range(5):
        box.fill(text)
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        if box.input_value() == text:
            return
    raise AssertionError(f"the page did not keep {text!r} in the field")


def status(page) -> str:
    return page.locator("#status textarea").input_value()


def wait_status(page, pattern: str, timeout=RUN_TIMEOUT_MS) -> str:
    from playwright.sync_api import TimeoutError

    try:
        page.wait_for_function("p => new RegExp(p).test(document.querySelector('#status textarea').value)",
                               arg=pattern, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"the status never matched {pattern!r}; it reads {status(page)!r}")
    return status(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"app-{name}.png"), full_page=True)


def error_badges(page) -> int:
    """gradio's red "Error" badge on a component (its status tracker's span.error)."""
    return page.locator("span.error:visible").count()


def frame_count(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_generate_shows_the_video(server, browser):
    url, outputs = server
    page = open_page(browser, url)
    assert "Demo model" in page.locator("#banner").inner_text()
    page.locator("#prompt textarea").fill("a small dog runs in the snow")
    set_number(page, "frames", 41)
    set_number(page, "steps", 100)  # the slider's end: long enough for the 0.5 s poll to catch two previews
    page.locator("#generate").click()
    # a second click in this window is not dropped silently: the button says why it is disabled
    button = page.locator("#generate")
    page.wait_for_function("() => document.querySelector('#generate').disabled", timeout=30_000)
    assert "one video per window at a time" in button.inner_text()
    # the live preview changes from step to step
    seen = set()
    end = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while not status(page).startswith("Done") and time.monotonic() < end:
        src = page.locator("#preview img").first.get_attribute("src") if page.locator("#preview img").count() else None
        if src and src not in seen:
            seen.add(src)
            if len(seen) == 2:
                shot(page, "preview")
        time.sleep(0.2)
    assert len(seen) >= 2, f"the preview showed {len(seen)} picture(s); status {status(page)!r}"
    done = wait_status(page, "^Done")
    page.wait_for_selector("#video video", timeout=RUN_TIMEOUT_MS)
    name = re.search(r"(\S+\.mp4)$", done).group(1)
    seed = int(re.search(r"seed (\d+)", done).group(1))
    mp4 = outputs / name
    assert frame_count(mp4) == 41
    sidecar = json.loads(mp4.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a small dog runs in the snow" and sidecar["seed"] == seed
    assert page.locator("#seed input").input_value() == str(seed)  # the seed used is shown
    assert f'"seed":{seed},' in re.sub(r"\s", "", page.locator("#params").inner_text())
    page.wait_for_selector("#gallery .thumbnail-item")
    assert "a small dog runs in the snow" in page.locator("#gallery").inner_text()
    page.wait_for_function("() => !document.querySelector('#generate').disabled", timeout=30_000)
    assert button.inner_text() == "Generate" and error_badges(page) == 0
    shot(page, "done")
    # an earlier output opens from the gallery with its parameters
    page.locator("#status textarea").evaluate("e => e.value = ''")
    page.locator("#gallery .thumbnail-item").first.click()
    assert wait_status(page, "^Showing ", timeout=30_000) == f"Showing {name}"


def test_second_request_waits_in_the_queue(server, browser):
    url, outputs = server
    first, second = open_page(browser, url), open_page(browser, url)
    set_number(first, "steps", 40)  # several seconds even on an idle machine
    set_number(first, "frames", 81)
    set_number(second, "steps", 2)
    set_number(second, "frames", 5)
    first.locator("#generate").click()
    wait_status(first, r"step \d+/40")  # running
    second.locator("#generate").click()
    wait_status(second, r"^queued: position 1 ", timeout=30_000)  # its position, in its status line
    shot(second, "queued")
    done_first = wait_status(first, "^Done")
    assert not status(second).startswith("Done")
    done_second = wait_status(second, "^Done")
    a, b = (outputs / re.search(r"(\S+\.mp4)$", d).group(1) for d in (done_first, done_second))
    assert frame_count(a) == 81 and frame_count(b) == 5
    assert b.stat().st_mtime >= a.stat().st_mtime  # the second ran after the first


def test_cancel_stops_the_run(server, browser):
    url, outputs = server
    page = open_page(browser, url)
    before = set(outputs.glob("*.mp4"))
    set_number(page, "steps", 100)  # 161 frames: several seconds of steps even on an idle machine
    set_number(page, "frames", 161)
    page.locator("#generate").click()
    wait_status(page, r"step \d+/100")
    page.locator("#cancel").click()
    cancelled = wait_status(page, "^Cancelled after step")
    assert int(re.search(r"step (\d+)/100", cancelled).group(1)) < 100
    assert set(outputs.glob("*.mp4")) == before
    assert error_badges(page) == 0  # a normal Cancel is no error
    page.wait_for_function("() => !document.querySelector('#generate').disabled", timeout=30_000)
    shot(page, "cancelled")
    # the app takes the next run
    set_number(page, "steps", 2)
    set_number(page, "frames", 5)
    page.locator("#generate").click()
    wait_status(page, "^Done")


def test_errors_are_shown_and_the_app_keeps_running(server, browser):
    url, _ = server
    page = open_page(browser, url)
    model = page.locator("#model input")
    model.fill("/nonexistent/Wan2.2-T2V-A14B")
    model.press("Enter")
    page.locator("#load").click()
    page.wait_for_selector(".toast-body:has-text('No folder /nonexistent/Wan2.2-T2V-A14B')")
    assert wait_status(page, "^Model not loaded: No folder", timeout=30_000)
    assert "Demo model" in page.locator("#banner").inner_text()  # the loaded model stays
    assert model.input_value() == "/nonexistent/Wan2.2-T2V-A14B" and error_badges(page) == 0  # the typed path shows
    shot(page, "load-error")
    page.locator("#prompt textarea").fill("  ")
    page.locator("#generate").click()
    page.wait_for_selector(".toast-body:has-text('The prompt is empty')")
    assert wait_status(page, "^Not started: The prompt is empty", timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#generate').disabled", timeout=30_000)
    assert error_badges(page) == 0
    shot(page, "input-error")
    page.locator("#prompt textarea").fill("a blue cat")
    set_number(page, "steps", 2)
    set_number(page, "frames", 5)
    page.locator("#generate").click()
    wait_status(page, "^Done")


def test_cancel_during_the_decode(server, browser):
    """161 frames on the demo: 41 latent frames to decode, several seconds; Cancel in the middle writes nothing."""
    url, outputs = server
    page = open_page(browser, url)
    before = set(outputs.iterdir())
    set_number(page, "steps", 2)
    set_number(page, "frames", 161)
    page.locator("#generate").click()
    line = wait_status(page, r"^decoding the video \(VAE\) frame \d+/41 · ")
    assert "ETA" in line
    shot(page, "decoding")
    page.locator("#cancel").click()
    cancelled = wait_status(page, "^Cancelled during the VAE decode")
    assert "nothing written" in cancelled
    assert set(outputs.iterdir()) == before and error_badges(page) == 0
    assert page.locator("#video video").count() == 0  # no half-way state: no video and no file
    shot(page, "cancelled-in-decode")


def test_lightning_preset_fills_the_sampler(server, browser):
    url, _ = server
    page = open_page(browser, url)
    for attempt in range(3):  # a click before the page's handlers are attached is lost: click again
        page.locator("#preset label:has-text('Lightning')").click()
        try:
            page.wait_for_function("() => document.querySelector('#steps input[type=number]').value === '4'",
                                   timeout=30_000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.wait_for_function("() => document.querySelector('#plan textarea').value.includes("
                           "'lightning preset, lightning grid · 4 steps euler · shift 5.0 · guidance 1.0 / 1.0')",
                           timeout=30_000)
    page.locator("#exact_attention input").check()
    page.wait_for_function("() => document.querySelector('#plan textarea').value.includes('Attention: exact')",
                           timeout=30_000)
    shot(page, "lightning")

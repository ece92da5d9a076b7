"""Quick events in a real browser while the handler of an earlier one is still running: the last one wins.

gradio's default trigger mode ("once" for .input, .submit, .blur) drops an event made while the listener's
previous call is pending. Two CI runs on a loaded 2-core machine hit it: three quick edits left the plan
showing the first one, and an Enter in the ComfyUI folder field was dropped behind a pending listing of the
still-empty field ("No folder given"). To make the races certain rather than load-dependent, the app here is
`python -m app` with `App.plan` and `App.comfyui_experts` slowed by 1.5 s. Same requirements and skip as
tests/test_app_browser.py.
"""

from __future__ import annotations

import pytest
from test_app_browser import CHROMIUM, app_server, fill_kept, open_page, set_number, wait_status
from test_app_browser import browser as browser  # noqa: F401 - the fixture, shared
from test_app_files import make_comfyui_folder

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")

SLOW_APP = """
import sys, time
from app import handlers
from app.__main__ import main
plan, experts = handlers.App.plan, handlers.App.comfyui_experts
handlers.App.plan = lambda self, s: (time.sleep(1.5), plan(self, s))[1]
handlers.App.comfyui_experts = lambda self, folder: (time.sleep(1.5), experts(self, folder))[1]
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    with app_server(tmp_path_factory, ["-c", SLOW_APP], tmp_path_factory.mktemp("outputs")) as url:
        yield url


def test_the_plan_ends_on_the_last_of_quick_edits(slow_server, browser):  # noqa: F811 - fixture
    page = open_page(browser, slow_server)
    # each edit lands while the one before it is still inside the slowed plan (1.5 s)
    set_number(page, "frames", 5)
    set_number(page, "steps", 3)
    set_number(page, "vae_preview_every", 1)
    page.wait_for_function("() => document.querySelector('#plan textarea').value.includes('full VAE every 1 steps')",
                           timeout=60_000)
    plan = page.locator("#plan textarea").input_value()
    assert " 3 steps " in plan, plan


def test_an_enter_behind_a_pending_listing_is_not_lost(slow_server, browser, tmp_path):  # noqa: F811 - fixture
    models, _ = make_comfyui_folder(tmp_path / "models", tmp_path / "cache")
    page = open_page(browser, slow_server)
    page.get_by_role("tab", name="ComfyUI models folder").click()
    folder = page.locator("#comfyui textarea, #comfyui input").first
    folder.click()
    page.locator("#comfyui_tokenizer textarea, #comfyui_tokenizer input").first.click()  # leaves it empty: a listing
    fill_kept(page, folder, str(models))
    folder.press("Enter")  # while the empty field's listing is still running
    wait_status(page, r"^8 expert file\(s\) in ", timeout=60_000)

"""Quick edits in a real browser while the plan is still being computed: the plan must end on the last edit.

gradio's default for an `.input` listener ("once") drops an edit made while the previous edit's update is
pending, so three quick edits left the plan showing the first one (a CI run on a loaded 2-core machine hit
it: `steps` and `vae_preview_every` were typed while the `frames` plan was pending). To make the race
certain rather than load-dependent, the app here is `python -m app` with `App.plan` slowed by 1.5 s.
Same requirements and skip as tests/test_app_browser.py.
"""

from __future__ import annotations

import pytest
from test_app_browser import CHROMIUM, app_server, open_page, set_number
from test_app_browser import browser as browser  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")

SLOW_PLAN_APP = """
import sys, time
from app import handlers
from app.__main__ import main
plan = handlers.App.plan
handlers.App.plan = lambda self, s: (time.sleep(1.5), plan(self, s))[1]
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    with app_server(tmp_path_factory, ["-c", SLOW_PLAN_APP], tmp_path_factory.mktemp("outputs")) as url:
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

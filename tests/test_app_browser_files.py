"""The model picker in a real browser: `python -m app` (started on the demo model) opens a ComfyUI models/
folder through the page, driven by Playwright in headless Chromium, and generates with it.

The folder is tests/test_app_files.py's `make_comfyui_folder` (tiny experts, the demo's umt5 encoder as
one file, the real-size random Wan2.1 VAE), so a run is a few seconds on a CPU. Same requirements, fixtures
and skip as tests/test_app_browser.py. Screenshots: tests/artifacts/app-files-*.png (the refused LoRA,
the loaded files, the finished run with its full-VAE preview).
"""

from __future__ import annotations

import json
import re

import pytest
from test_app_browser import (
    CHROMIUM,
    error_badges,
    fill_kept,
    frame_count,
    open_page,
    set_number,
    shot,
    status,
    wait_status,
)
from test_app_browser import browser as browser  # noqa: F401 - the fixture, shared
from test_app_browser import server as server  # noqa: F401
from test_app_files import FP8, HIGH, LORA, LOW, TEXT, VAE_FILE, make_comfyui_folder

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return make_comfyui_folder(tmp_path_factory.mktemp("comfyui") / "models", tmp_path_factory.mktemp("cache"))


def pick(page, elem_id: str, name: str) -> None:
    """Choose `name` in the dropdown #elem_id (its options list opens on a click)."""
    page.locator(f"#{elem_id} input").click()
    page.locator("[data-testid=dropdown-option]", has_text=name).first.click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value === v", arg=[elem_id, name],
                           timeout=30_000)


def test_a_comfyui_folder_is_picked_and_generates(server, browser, comfy):  # noqa: F811 - fixtures
    url, outputs = server
    models, tokenizer = comfy
    page = open_page(browser, url)
    page.get_by_role("tab", name="ComfyUI models folder").click()
    folder = page.locator("#comfyui textarea, #comfyui input").first
    fill_kept(page, folder, str(models))  # the tab's fields were mounted by the click just now
    folder.press("Enter")  # lists diffusion_models/ into the two dropdowns
    folder.press("Tab")  # and leaves the field, as a person does: listed again only if the Enter's listing missed
    wait_status(page, r"^8 expert file\(s\) in ", timeout=30_000)
    fill_kept(page, page.locator("#comfyui_tokenizer textarea, #comfyui_tokenizer input").first, str(tokenizer))

    # a LoRA picked as an expert: wan_lite's message in the status, the typed folder and choices stay
    pick(page, "comfyui_high", LORA)
    pick(page, "comfyui_low", LOW)
    page.locator("#load_comfyui").click()
    refused = wait_status(page, "^Model not loaded: ", timeout=60_000)
    assert f"{LORA}: this is a LoRA" in refused and "not an expert" in refused
    assert folder.input_value() == str(models) and page.locator("#comfyui_high input").input_value() == LORA
    assert "Demo model" in page.locator("#banner").inner_text() and error_badges(page) == 0
    shot(page, "files-refused")

    # the right pair loads; the banner and the plan name the files
    pick(page, "comfyui_high", HIGH)
    assert FP8[0] not in page.locator("#comfyui_high input").input_value()
    page.locator("#load_comfyui").click()
    wait_status(page, "^Loaded ", timeout=120_000)
    banner = page.locator("#banner").inner_text()
    assert all(name in banner for name in (HIGH, LOW, TEXT, VAE_FILE))
    page.wait_for_function("() => document.querySelector('#plan textarea').value.includes('Model: files')",
                           timeout=90_000)  # an upper bound: a loaded 2-core CI machine once took over 30 s
    shot(page, "files-loaded")

    # a run with the full-VAE preview every step
    page.locator("#prompt textarea").fill("a red cat walks on the beach")
    set_number(page, "frames", 5)
    set_number(page, "steps", 3)
    set_number(page, "vae_preview_every", 1)
    page.wait_for_function("() => document.querySelector('#plan textarea').value.includes('full VAE every 1 steps')",
                           timeout=90_000)
    page.locator("#generate").click()
    wait_status(page, r"full VAE preview at step \d: \d+\.\d s")  # its cost, while it runs
    done = wait_status(page, "^Done")
    page.wait_for_selector("#vae_preview img", timeout=30_000)
    page.wait_for_selector("#video video", timeout=30_000)
    mp4 = outputs / re.search(r"(\S+\.mp4)$", done).group(1)
    assert frame_count(mp4) == 5
    files = json.loads(mp4.with_suffix(".json").read_text())["model_files"]
    assert files["high"] == str(models / "diffusion_models" / HIGH) and files["vae"] == str(models / "vae" / VAE_FILE)
    assert files["text_encoder"].endswith(TEXT) and files["tokenizer"] == str(tokenizer)
    params = re.sub(r"\s", "", page.locator("#params").inner_text())
    assert HIGH in params and '"layout":"files"' in params
    assert error_badges(page) == 0
    shot(page, "files-done")
    assert status(page).startswith("Done")

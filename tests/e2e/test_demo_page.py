"""The demo page (`GET /`) in a real headless Chromium, driven by Playwright, against the shared server:
it loads, sends a prompt, the streamed pane grows over several observations before the non-streamed pane
fills, every figure appears, and it fits a phone-width screen. Screenshots go to tests/artifacts/."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FIGURES = ("ttft", "rate", "total", "tokens")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the browser test needs Debian's chromium: apt-get install -y chromium (scripts/test.sh does)"
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def pane_state(page) -> dict:
    return page.evaluate("""() => Object.fromEntries(["stream", "whole"].map((id) => {
        const root = document.getElementById(id), q = (n) => root.querySelector(`[data-${n}]`).textContent;
        return [id, {text: q("text"), error: root.querySelector("[data-text]").classList.contains("error"),
                     ttft: q("ttft"), rate: q("rate"), total: q("total"), tokens: q("tokens")}];
    }))""")


def test_streamed_pane_grows_before_the_whole_answer_arrives(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(server + "/")
    assert "Streaming, side by side" in page.title() + page.content()
    page.fill("#prompt", "Write a short story about a lighthouse keeper who finds a message in a bottle.")
    page.fill("#max", "24")
    page.click("#go")
    lengths: list[int] = []  # the streamed pane's text length at each observation, while the other is empty
    shot = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = pane_state(page)
        assert not state["stream"]["error"] and not state["whole"]["error"], state
        if state["whole"]["text"]:
            break
        lengths.append(len(state["stream"]["text"]))
        if not shot and lengths[-1] > 40:  # mid-answer: the picture the README shows
            page.screenshot(path=str(ARTIFACTS / "demo-page-streaming.png"))
            shot = True
        page.wait_for_timeout(50)
    growth = sorted({n for n in lengths if n})
    assert len(growth) >= 3, f"the streamed pane should grow token by token before the other fills: {lengths}"
    assert lengths == sorted(lengths), "streamed text only grows"
    page.wait_for_selector("#go:not([disabled])", timeout=300_000)  # both requests done
    state = pane_state(page)
    for pane in ("stream", "whole"):
        assert state[pane]["text"] and not state[pane]["error"], state
        for figure in FIGURES:
            assert state[pane][figure] != "–", (pane, figure, state)
        assert float(state[pane]["ttft"].removesuffix(" s")) > 0
        assert float(state[pane]["rate"]) > 0 and int(state[pane]["tokens"]) > 0
    # The whole answer's first token is its last: it cannot come before the streamed one's.
    assert float(state["whole"]["ttft"].removesuffix(" s")) >= float(state["stream"]["ttft"].removesuffix(" s"))
    page.screenshot(path=str(ARTIFACTS / "demo-page-done.png"))
    page.close()


def test_the_page_fits_a_phone(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.goto(server + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
    stream, whole = page.locator("#stream").bounding_box(), page.locator("#whole").bounding_box()
    assert whole["y"] >= stream["y"] + stream["height"], "the panes stack on a narrow screen"
    assert page.locator("#go").bounding_box()["width"] > 300, "a button wide enough for a thumb"
    page.screenshot(path=str(ARTIFACTS / "demo-page-phone.png"), full_page=True)
    page.close()

"""``tests/browser.py``: headless Chromium through chromedriver - JavaScript, console and HTTP capture, real mouse
events, screenshots - on a local page (no server). Skips when Chromium or chromedriver is missing."""

from __future__ import annotations

import pytest

from browser import Browser, missing_requirements

PAGE = """data:text/html,<!doctype html><html><body style="margin:0">
<canvas id="c" width="200" height="100"></canvas>
<script>
console.log('hello', {a: [1, 2]});
console.error(new Error('logged error'));
document.getElementById('c').addEventListener('click', (e) => { window.clicked = [e.clientX, e.clientY]; });
fetch('data:text/plain,abc').then((r) => r.text()).then((t) => { window.fetched = t; });
Promise.reject(new Error('nobody caught me'));
</script></body></html>"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    with Browser(tmp_path_factory.mktemp("browser"), size=(800, 600)) as b:
        yield b


def test_javascript_console_and_errors(browser):
    browser.open(PAGE)
    browser.wait_js("window.fetched === 'abc'", 20)
    assert browser.js("return arguments[0] + 1;", 41) == 42
    assert browser.js("const g = document.createElement('canvas').getContext('webgl2'); return !!g;")  # WebGL on CPU
    texts = [(c["level"], c["text"]) for c in browser.console()]
    assert ("log", "hello {a: [1, 2]}") in texts and ("error", "Error: logged error") in texts
    rejected = [e for e in browser.errors() if e["level"] == "unhandledrejection"]
    assert rejected and rejected[0]["text"] == "Error: nobody caught me" and "nobody caught me" in rejected[0]["stack"]
    calls = browser.requests("data:text/plain")
    assert calls and calls[0]["kind"] == "fetch" and calls[0]["status"] == 200


def test_mouse_and_screenshot(browser):
    browser.open(PAGE)
    browser.mouse_click(50, 40)
    browser.wait_js("window.clicked", 10)
    assert browser.js("return window.clicked;") == [50, 40]
    png = browser.screenshot("page")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # entries of pages already left are kept
    browser.open("data:text/html,<script>console.warn('second page')</script>")
    texts = [c["text"] for c in browser.console()]
    assert "second page" in texts and "hello {a: [1, 2]}" in texts


def test_wait_js_times_out_with_the_console_tail(browser):
    browser.open("data:text/html,<script>console.log('waiting here')</script>")
    with pytest.raises(TimeoutError, match="waiting here"):
        browser.wait_js("window.never", 1.0, "something that never comes")

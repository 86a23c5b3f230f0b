"""A headless Chromium for end-to-end tests of the web viewers (OHIF): open a URL, run JavaScript, click, collect the
console and the page's HTTP calls, take screenshots.

It drives ``chromedriver`` over the W3C WebDriver HTTP protocol with ``urllib`` (no Selenium needed, nothing to
install in the project's virtual environment), plus Chrome DevTools commands through chromedriver's
``/goog/cdp/execute`` endpoint (real mouse events; a hook installed before any page script runs records the console,
uncaught errors, unhandled promise rejections and the page's XMLHttpRequest / fetch calls).

Requirements: the Debian packages ``chromium`` and ``chromium-driver`` (or ``MEDSAMIX_CHROMIUM`` /
``MEDSAMIX_CHROMEDRIVER`` pointing at the executables); :func:`missing_requirements` says why the browser tests
cannot run here, and they skip with that reason.

Isolation: with a :class:`orthanc.Sandbox`, chromedriver and Chromium are started inside its private network
namespace (loopback only, the same as Orthanc and the server, so the browser reaches them at ``127.0.0.1``) and every
WebDriver request goes through :meth:`Sandbox.call`; without one they run on the host, where chromedriver listens on
127.0.0.1 only. Chromium runs headless (``--headless=new``) with WebGL on the CPU (SwiftShader through ANGLE), as
root needs ``--no-sandbox``, and keeps its profile in the given work folder. Everything is stopped on exit.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app_server import _tail, free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER_NAMES = ("chromedriver",)
START_TIMEOUT_S = 60.0
W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

# Installed before every page's own scripts (Page.addScriptToEvaluateOnNewDocument): every console call, uncaught
# error and unhandled promise rejection goes to window.__medsamixConsole as {level, text, stack, t}; every
# XMLHttpRequest / fetch call to window.__medsamixNet (see Browser.requests).
PAGE_HOOK = r"""
(() => {
  if (window.__medsamixConsole) return;
  const log = (window.__medsamixConsole = []);
  const fmt = (v, depth = 0) => {
    try {
      if (v instanceof Error) return `${v.name}: ${v.message}`;
      if (v === undefined) return 'undefined';
      if (typeof v === 'string') return v;
      if (typeof v === 'function') return `[function ${v.name || ''}]`;
      if (typeof v !== 'object' || v === null) return String(v);
      if (v instanceof ArrayBuffer) return `ArrayBuffer(${v.byteLength})`;
      if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${v.length})`;
      if (depth > 2) return Array.isArray(v) ? '[...]' : '{...}';
      if (Array.isArray(v)) return '[' + v.slice(0, 20).map((x) => fmt(x, depth + 1)).join(', ') + ']';
      const keys = Object.keys(v).slice(0, 30);
      return '{' + keys.map((k) => { let x; try { x = v[k]; } catch (e) { x = '?'; }
                                      return k + ': ' + fmt(x, depth + 1); }).join(', ') + '}';
    } catch (e) { return '[unprintable]'; }
  };
  const push = (level, args, stack) => {
    if (log.length > 5000) log.splice(0, 1000);
    const text = Array.from(args).map((a) => fmt(a)).join(' ');
    log.push({ level, text: text.length > 4000 ? text.slice(0, 4000) + '...' : text, stack: stack || null,
               t: Date.now() });
  };
  for (const level of ['log', 'info', 'warn', 'error', 'debug']) {
    const orig = console[level].bind(console);
    console[level] = (...args) => {
      const err = args.find((a) => a instanceof Error);
      push(level, args, err ? String(err.stack || '') : null);
      return orig(...args);
    };
  }
  // XMLHttpRequest (axios) and fetch: method, url, status, content type, size, first bytes, form fields
  const net = (window.__medsamixNet = []);
  const form = (body) => {
    if (typeof FormData !== 'undefined' && body instanceof FormData) {
      const f = {};
      for (const [k, v] of body.entries()) {
        f[k] = typeof v === 'string' ? v.slice(0, 20000) : `file:${v.name}:${v.size}`;
      }
      return { form: f };
    }
    return typeof body === 'string' ? { body: body.slice(0, 20000) } : {};
  };
  const head = (buf) => Array.from(new Uint8Array(buf.slice(0, 32)));
  const XO = XMLHttpRequest.prototype.open, XS = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (m, u) {
    this.__rec = { method: m, url: String(u) };
    return XO.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function (body) {
    const rec = Object.assign(this.__rec || {}, form(body), { t0: Date.now(), kind: 'xhr' });
    if (net.length > 2000) net.splice(0, 500);
    net.push(rec);
    this.addEventListener('loadend', () => {
      rec.status = this.status; rec.ms = Date.now() - rec.t0;
      rec.contentType = this.getResponseHeader('content-type');
      try {
        const r = this.response;
        if (r instanceof ArrayBuffer) { rec.size = r.byteLength; rec.head = head(r); }
        else if (typeof r === 'string') { rec.size = r.length; rec.text = r.slice(0, 2000); }
        else if (r && typeof r === 'object') { rec.text = JSON.stringify(r).slice(0, 2000); }
      } catch (e) { rec.readError = String(e); }
    });
    return XS.apply(this, arguments);
  };
  if (window.fetch) {
    const F = window.fetch;
    window.fetch = function (input, init) {
      const rec = Object.assign({ method: (init && init.method) || 'GET', url: String(input && input.url || input),
                                  t0: Date.now(), kind: 'fetch' }, form(init && init.body));
      if (net.length > 2000) net.splice(0, 500);
      net.push(rec);
      return F.apply(this, arguments).then((resp) => {
        rec.status = resp.status; rec.ms = Date.now() - rec.t0; rec.contentType = resp.headers.get('content-type');
        return resp;
      }, (err) => { rec.error = String(err); throw err; });
    };
  }
  window.addEventListener('error', (e) => push('uncaught', [e.error || e.message],
                                               e.error && e.error.stack ? String(e.error.stack) : null));
  window.addEventListener('unhandledrejection', (e) => push(
    'unhandledrejection', [e.reason], e.reason && e.reason.stack ? String(e.reason.stack) : null));
})();
"""


def _find(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.path.exists(os.environ[env]) else None
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def chromium_path() -> str | None:
    return _find("MEDSAMIX_CHROMIUM", CHROMIUM_NAMES)


def chromedriver_path() -> str | None:
    return _find("MEDSAMIX_CHROMEDRIVER", CHROMEDRIVER_NAMES)


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if chromium_path() is None:
        return "Chromium is not installed (Debian: apt-get install chromium; or set MEDSAMIX_CHROMIUM)"
    if chromedriver_path() is None:
        return "chromedriver is not installed (Debian: apt-get install chromium-driver; or set MEDSAMIX_CHROMEDRIVER)"
    return None


class WebDriverError(RuntimeError):
    """A WebDriver command failed (the driver's error and message are in the text)."""


class Browser:
    """One headless Chromium session.

    Args:
        workdir: Folder for the profile, chromedriver's log and screenshots.
        sandbox: A started :class:`orthanc.Sandbox` to run in (None: the host's loopback).
        size: Window size in CSS pixels.
        extra_args: More Chromium switches.
    """

    def __init__(self, workdir: Path, sandbox: Any = None, size: tuple[int, int] = (1600, 1000),
                 extra_args: list[str] | None = None) -> None:
        why = missing_requirements()
        if why:
            raise RuntimeError(why)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sandbox = sandbox
        self.size = size
        self.extra_args = list(extra_args or [])
        self.session: str | None = None
        self._proc: subprocess.Popen | None = None
        self._driver_url = ""
        self._log_path = self.workdir / "chromedriver.log"
        self._console: list[dict[str, Any]] = []  # entries pulled from pages already left
        self._shots = 0

    # ---------------------------------------------------------------- life cycle
    def __enter__(self) -> "Browser":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.sandbox.call(fn, *args) if self.sandbox is not None else fn(*args)

    def _start(self) -> None:
        isolated = bool(self.sandbox is not None and self.sandbox.isolated)
        port = 9515 if isolated else free_port()  # inside a private namespace every port is free
        self._driver_url = f"http://127.0.0.1:{port}"
        cmd = [chromedriver_path(), f"--port={port}", f"--log-path={self._log_path}", "--log-level=INFO"]
        if self.sandbox is not None:
            self._proc = self.sandbox.start(cmd, self.workdir / "chromedriver.out")
        else:
            with open(self.workdir / "chromedriver.out", "wb") as out:
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self._request("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError, WebDriverError):
                pass
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromedriver exited ({self._proc.returncode}):\n"
                                   f"{_tail(self.workdir / 'chromedriver.out')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chromedriver did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        args = ["--headless=new", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                "--disable-dev-shm-usage", f"--window-size={self.size[0]},{self.size[1]}",
                f"--user-data-dir={self.workdir / 'profile'}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
                "--ignore-gpu-blocklist"] + self.extra_args
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {"binary": chromium_path(), "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        value = self._request("POST", "/session", caps, timeout=START_TIMEOUT_S)
        self.session = value["sessionId"]
        self.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_HOOK})
        self.cdp("Runtime.evaluate", {"expression": PAGE_HOOK})

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                self._request("DELETE", f"/session/{self.session}", timeout=30)
            self.session = None
        if self._proc is not None:
            from orthanc import stop

            stop(self._proc)
            self._proc = None

    # ---------------------------------------------------------------- protocol
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        def go() -> Any:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(self._driver_url + path, data=data, method=method)
            if data is not None:
                req.add_header("Content-Type", "application/json; charset=utf-8")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                raw = e.read()
                try:
                    v = json.loads(raw).get("value", {})
                    msg = f"{v.get('error')}: {str(v.get('message', ''))[:3000]}"
                except (ValueError, AttributeError):
                    msg = raw[:3000].decode(errors="replace")
                raise WebDriverError(f"{method} {path}: HTTP {e.code}: {msg}") from None
            return json.loads(raw).get("value") if raw else None
        return self._call(go)

    def _s(self, path: str) -> str:
        if self.session is None:
            raise RuntimeError("no browser session")
        return f"/session/{self.session}{path}"

    def cdp(self, cmd: str, params: dict[str, Any] | None = None) -> Any:
        """A Chrome DevTools Protocol command on the current page (e.g. ``Input.dispatchMouseEvent``)."""
        return self._request("POST", self._s("/goog/cdp/execute"), {"cmd": cmd, "params": params or {}})

    # ---------------------------------------------------------------- pages
    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait for its load event (console entries of the page left are kept)."""
        self._save_console()
        self._request("POST", self._s("/url"), {"url": url}, timeout=180)

    @property
    def url(self) -> str:
        return self._request("GET", self._s("/url"))

    def js(self, script: str, *args: Any, timeout: float = 120.0) -> Any:
        """Run ``script`` (a function body: ``return ...``; ``arguments[i]`` are ``args``) and return its value."""
        return self._request("POST", self._s("/execute/sync"), {"script": script, "args": list(args)},
                             timeout=timeout)

    def js_async(self, script: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Run an async function body; its value is what the body's last argument (a callback) is called with."""
        self._request("POST", self._s("/timeouts"), {"script": int(timeout_s * 1000)})
        return self._request("POST", self._s("/execute/async"), {"script": script, "args": list(args)},
                             timeout=timeout_s + 30)

    def wait_js(self, expression: str, timeout_s: float = 60.0, what: str | None = None,
                interval_s: float = 0.5) -> Any:
        """Poll the JavaScript ``expression`` until it is truthy; return its value.

        Raises:
            TimeoutError: With ``what`` (or the expression), the page URL and the last console lines.
        """
        deadline = time.monotonic() + timeout_s
        last_err = ""
        while True:
            try:
                v = self.js(f"return ({expression});")
                if v:
                    return v
            except WebDriverError as e:
                last_err = str(e)
            if time.monotonic() > deadline:
                tail = "\n".join(f"  [{c['level']}] {c['text'][:300]}" for c in self.console()[-15:])
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what or expression} at {self.url}"
                                   f"{'; last error: ' + last_err if last_err else ''}\nconsole tail:\n{tail}")
            time.sleep(interval_s)

    def click_css(self, selector: str) -> None:
        """Click the first element matching ``selector`` (WebDriver element click: scrolls, checks it is shown)."""
        el = self._request("POST", self._s("/element"), {"using": "css selector", "value": selector})
        self._request("POST", self._s(f"/element/{el[W3C_ELEMENT]}/click"), {})

    def type_css(self, selector: str, text: str, clear: bool = True) -> None:
        """Type ``text`` into the first element matching ``selector`` (cleared first; the element is looked up
        again after clearing, as frameworks like React may replace it)."""
        def find() -> str:
            return self._request("POST", self._s("/element"), {"using": "css selector", "value": selector})[W3C_ELEMENT]
        if clear:
            self._request("POST", self._s(f"/element/{find()}/clear"), {})
        self._request("POST", self._s(f"/element/{find()}/value"), {"text": text})

    def mouse_click(self, x: float, y: float, button: str = "left") -> None:
        """A real mouse click at page (CSS pixel) coordinates: move, press, release (DevTools input events)."""
        for kind, extra in (("mouseMoved", {}), ("mousePressed", {"button": button, "clickCount": 1}),
                            ("mouseReleased", {"button": button, "clickCount": 1})):
            self.cdp("Input.dispatchMouseEvent", {"type": kind, "x": float(x), "y": float(y),
                                                  "buttons": 1 if kind == "mousePressed" else 0, **extra})
            time.sleep(0.05)

    def mouse_drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 8) -> None:
        """Press at (x0, y0), move in ``steps`` to (x1, y1), release (left button)."""
        self.cdp("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": float(x0), "y": float(y0)})
        self.cdp("Input.dispatchMouseEvent", {"type": "mousePressed", "x": float(x0), "y": float(y0),
                                              "button": "left", "buttons": 1, "clickCount": 1})
        for s in range(1, steps + 1):
            x, y = x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps
            self.cdp("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y, "button": "left",
                                                  "buttons": 1})
            time.sleep(0.03)
        self.cdp("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": float(x1), "y": float(y1),
                                              "button": "left", "buttons": 0, "clickCount": 1})

    def screenshot(self, name: str) -> Path:
        """A PNG of the viewport, saved as ``<workdir>/<nn>-<name>.png``; returns the path."""
        self._shots += 1
        png = base64.b64decode(self._request("GET", self._s("/screenshot")))
        path = self.workdir / f"{self._shots:02d}-{name}.png"
        path.write_bytes(png)
        return path

    # ---------------------------------------------------------------- console
    def _pull_console(self) -> list[dict[str, Any]]:
        try:
            got = self.js("const c = window.__medsamixConsole; return c ? c.splice(0, c.length) : [];")
        except WebDriverError:
            return []
        return list(got or [])

    def _save_console(self) -> None:
        if self.session is not None:
            self._console.extend(self._pull_console())

    def console(self) -> list[dict[str, Any]]:
        """Everything the pages logged so far: ``{level, text, stack, t}``; levels are log/info/warn/error/debug
        (console calls), uncaught and unhandledrejection (errors nobody caught)."""
        self._save_console()
        return list(self._console)

    def requests(self, contains: str = "") -> list[dict[str, Any]]:
        """The current page's XMLHttpRequest / fetch calls whose URL contains ``contains``: ``{kind, method, url,
        form | body, status, contentType, size, head (first 32 bytes of a binary answer) | text, ms}``
        (``status`` is missing while a call is under way)."""
        try:
            got = self.js("return (window.__medsamixNet || []).filter(r => r.url.includes(arguments[0]));", contains)
        except WebDriverError:
            return []
        return list(got or [])

    def errors(self) -> list[dict[str, Any]]:
        """Console errors, uncaught errors and unhandled promise rejections."""
        return [c for c in self.console() if c["level"] in ("error", "uncaught", "unhandledrejection")]

    def driver_log(self) -> list[dict[str, Any]]:
        """Chromium's own browser log as chromedriver collected it (also network errors, e.g. failed loads)."""
        try:
            return list(self._request("POST", self._s("/se/log"), {"type": "browser"}) or [])
        except WebDriverError:
            return []

    def dump(self, name: str) -> Path:
        """Write the collected console (and the driver log) as JSON to ``<workdir>/<name>.json``; returns it."""
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps({"console": self.console(), "driver_log": self.driver_log()}, indent=1))
        return path

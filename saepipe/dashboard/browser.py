"""Headless Chromium for tests and screenshots: find (or install) it, and drive it over the DevTools
protocol with nothing but the standard library.

The protocol runs over ``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on file
descriptors 3 and 4 of the browser), so no websocket client and no open port are needed.

    from saepipe.dashboard.browser import Browser, ensure_chromium
    with Browser(ensure_chromium()) as b:
        b.goto("file:///.../index.html", ready="index")
        b.screenshot("index.png")
        print(b.errors)          # console errors, uncaught exceptions, failed loads

``ensure_chromium`` finds ``$SAEPIPE_CHROMIUM``, then ``chromium``/``google-chrome`` on the PATH (and
the usual macOS app paths); when none is there and it may (root or password-less sudo, with apt), it
installs Debian's ``chromium`` package. Otherwise it raises :class:`ChromiumUnavailable`, whose message
says how to get one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "headless_shell",
)
_MAC_APPS = (
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--font-render-hinting=none",
)


_TRAMPOLINE = (
    "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
    "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
)


class ChromiumUnavailable(RuntimeError):
    """No Chromium could be found or installed."""


class BrowserError(RuntimeError):
    """The browser failed or a DevTools command returned an error."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("SAEPIPE_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    if platform.system() == "Darwin":
        for app in _MAC_APPS:
            if os.access(app, os.X_OK):
                return app
    return None


def _can_install() -> list[str] | None:
    """The command prefix that may run apt-get as root here, or None."""
    if platform.system() != "Linux" or not shutil.which("apt-get"):
        return None
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["sudo", "-n"]
    return None


def install_chromium(timeout: float = 900) -> str:
    """``apt-get install -y chromium`` (as root or with password-less sudo); returns its path."""
    prefix = _can_install()
    if prefix is None:
        raise ChromiumUnavailable(_unavailable_message("this user cannot run apt-get as root"))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(
            [*prefix, *cmd], capture_output=True, text=True, env=env, timeout=timeout
        )
        if proc.returncode != 0 and cmd[1] == "install":
            raise ChromiumUnavailable(
                _unavailable_message(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
            )
    path = find_chromium()
    if path is None:
        raise ChromiumUnavailable(
            _unavailable_message("apt-get installed chromium but it is not on PATH")
        )
    return path


def _unavailable_message(why: str) -> str:
    return (
        f"Chromium is needed for the dashboard's browser tests and was not found ({why}). "
        "Install it (Debian/Ubuntu: `sudo apt-get install -y chromium`; macOS: install Chromium or "
        "Google Chrome) or point SAEPIPE_CHROMIUM at a Chrome/Chromium executable."
    )


def ensure_chromium(install: bool = True) -> str:
    """A Chromium executable: found, or installed with apt where allowed; else ChromiumUnavailable."""
    path = find_chromium()
    if path:
        return path
    if install and _can_install() is not None:
        return install_chromium()
    raise ChromiumUnavailable(_unavailable_message("not on PATH, and it cannot be installed here"))


def dump_dom(
    url: str,
    executable: str | None = None,
    *,
    timeout: float = 60.0,
    extra_args: tuple[str, ...] = (),
) -> str:
    """The DOM of ``url`` after its load event, serialised (``chromium --headless --dump-dom``)."""
    exe = executable or ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="saepipe-chromium-") as profile:
        proc = subprocess.run(
            [exe, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *extra_args, "--dump-dom", url],
            capture_output=True,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise BrowserError(
            f"chromium --dump-dom failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
        )
    return proc.stdout.decode("utf-8")


def _high_fd(fd: int) -> int:
    """Duplicate ``fd`` to a number >= 10, so moving the two ends onto 3 and 4 cannot clobber one."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol (pipe transport).

    ``errors`` collects console errors, uncaught exceptions and failed resource loads of the page.
    """

    def __init__(
        self,
        executable: str | None = None,
        *,
        width: int = 1280,
        height: int = 900,
        timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ):
        self.executable = executable or ensure_chromium()
        self.timeout = timeout
        self.errors: list[str] = []
        self.console: list[str] = []
        self._profile = tempfile.mkdtemp(prefix="saepipe-chromium-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        to_child_r, from_child_w = _high_fd(to_child_r), _high_fd(from_child_w)
        args = [
            *HEADLESS_FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-pipe",
            *extra_args,
            "about:blank",
        ]
        # The browser reads commands on fd 3 and writes replies on fd 4: a tiny Python trampoline
        # (no site, so it starts in milliseconds) moves the pipe ends there, then execs the browser.
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-E",
                "-c",
                _TRAMPOLINE,
                str(to_child_r),
                str(from_child_w),
                self.executable,
                *args,
            ],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._w = os.fdopen(to_child_w, "wb", buffering=0)
        self._r = from_child_r
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        self._closed = False
        self._stderr_tail: list[str] = []
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="cdp-reader")
        self._reader.start()
        threading.Thread(target=self._stderr_loop, daemon=True, name="cdp-stderr").start()
        self.session: str | None = None
        try:
            self._attach(width, height)
        except Exception:
            self.close()
            raise

    # --- transport ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._on_event(msg)
                    self._events.put(msg)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _stderr_loop(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr_tail = [*self._stderr_tail[-30:], line.decode("utf-8", "replace").rstrip()]

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run one DevTools command (on the page's session unless ``session=False``); its result."""
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        try:
            self._w.write(json.dumps(msg).encode() + b"\0")
        except (BrokenPipeError, OSError) as e:
            raise BrowserError(f"browser is gone ({e}); stderr: {self._stderr()}") from e
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"browser exited during {method}; stderr: {self._stderr()}")
                if left <= 0:
                    raise BrowserError(f"{method} timed out after {timeout or self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _stderr(self) -> str:
        return " | ".join(self._stderr_tail[-5:])

    def _on_event(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            self.console.append(f"{p.get('type')}: {text}")
            if p.get("type") in ("error", "assert"):
                self.errors.append(f"console.{p.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            desc = d.get("exception", {}).get("description") or d.get("text")
            self.errors.append(
                f"uncaught exception: {desc} ({d.get('url', '')}:{d.get('lineNumber')})"
            )
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            if e.get("level") == "error":
                self.errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())

    def _attach(self, width: int, height: int) -> None:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        pages = [t for t in targets if t.get("type") == "page"]
        if pages:
            target = pages[0]["targetId"]
        else:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)[
                "targetId"
            ]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # --- page ------------------------------------------------------------------------------
    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """Evaluate JavaScript in the page; its value (JSON-serialisable results only)."""
        r = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(
                f"JS error: {d.get('exception', {}).get('description') or d.get('text')}"
            )
        return r.get("result", {}).get("value")

    def wait_for(
        self, expression: str, timeout: float | None = None, interval: float = 0.02
    ) -> Any:
        """Poll a JS expression until it is truthy; its value. Errors while a page is being replaced
        (no document yet, destroyed context) count as not yet."""
        deadline = time.monotonic() + (timeout or self.timeout)
        last_error = None
        while True:
            try:
                v = self.evaluate(expression)
            except BrowserError as e:
                if "timed out" in str(e) or "browser" in str(e):
                    raise
                v, last_error = None, e
            if v:
                return v
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"timed out waiting for {expression!r}; last error: {last_error}; page errors: {self.errors}"
                )
            time.sleep(interval)

    def goto(self, url: str, *, ready: str | None = None, timeout: float | None = None) -> float:
        """Load ``url`` as a new document; wait for the load event, and for ``<html data-ready=ready>``
        when given. Returns seconds from navigation start to ready (``SAE.readyAt`` when the page
        records it, else now), as the page measured them."""
        current = self.evaluate("location.href") or ""
        if current.split("#")[0] == url.split("#")[0] and current != "about:blank":
            # Only the fragment differs: that would be a same-document navigation; start afresh.
            self.send("Page.navigate", {"url": "about:blank"})
            self.wait_for(
                "location.href === 'about:blank' && document.readyState === 'complete'", timeout
            )
        self.send("Page.navigate", {"url": url})
        cond = "document.readyState === 'complete'"
        if ready is not None:
            cond += f" && document.documentElement.dataset.ready === {json.dumps(ready)}"
        self.wait_for(cond, timeout)
        ms = self.evaluate("(window.SAE && window.SAE.readyAt) || performance.now()")
        return float(ms) / 1000.0

    def set_hash(
        self, fragment: str, *, ready: str | None = None, timeout: float | None = None
    ) -> None:
        self.evaluate(f"location.hash = {json.dumps(fragment)}")
        if ready is not None:
            self.wait_for(
                f"document.documentElement.dataset.ready === {json.dumps(ready)}", timeout
            )

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input and type into it as a user would (input events fire)."""
        self.evaluate(
            f"(function(){{var e=document.querySelector({json.dumps(selector)}); e.focus(); e.select && e.select();}})()"
        )
        self.send("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {
                    "type": kind,
                    "key": "Enter",
                    "code": "Enter",
                    "windowsVirtualKeyCode": 13,
                    "text": "\r" if kind == "keyDown" else "",
                },
            )

    def key(self, key: str) -> None:
        """Press and release one key (``"ArrowLeft"``, ``"Escape"``...) on the focused element."""
        codes = {
            "ArrowLeft": 37,
            "ArrowUp": 38,
            "ArrowRight": 39,
            "ArrowDown": 40,
            "Escape": 27,
            "Tab": 9,
        }
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": codes.get(key, 0)},
            )

    def hover(self, selector: str) -> None:
        """Move the mouse over the centre of the first element matching ``selector``."""
        x, y = self._centre(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first element matching ``selector``."""
        x, y = self._centre(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def _centre(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(
            f"(function(){{var e=document.querySelector({json.dumps(selector)}); if(!e) return null;"
            "e.scrollIntoView({block:'center'}); var r=e.getBoundingClientRect();"
            "return [r.left + r.width/2, r.top + r.height/2];})()"
        )
        if not box:
            raise BrowserError(f"no element matches {selector!r}")
        return float(box[0]), float(box[1])

    def screenshot(
        self, path: str | Path, *, full_page: bool = False, max_height: int = 6000
    ) -> Path:
        """Save a PNG of the viewport (or the whole page, up to ``max_height`` CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            m = self.send("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": min(size["height"], max_height),
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrowserError):
                self.send("Browser.close", session=False, timeout=5)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self._w.close()
        self._reader.join(timeout=5)  # it ends at the pipe's EOF, when the browser has exited
        with contextlib.suppress(OSError):
            os.close(self._r)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""report.html: self-contained, escaped, highlighted; rendered in headless Chromium over DevTools.

The browser test drives Debian's ``chromium`` through the DevTools protocol
with a 60-line websocket client (no extra dependency): it collects console
errors, exceptions and log errors, measures the three columns with
``Runtime.evaluate`` and takes a screenshot. A control page with a script
proves that the error capture (and the page's CSP) work, so "no errors" means
something.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from mlx_distill.compare import CompareConfig, compare_run
from mlx_distill.report import CSP, highlight, render_markdown
from tests.test_compare import BROKEN, CASES, IDS, canned_judge, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAYLOAD = (
    '</script><script>document.body.setAttribute("data-pwned","script")</script>'
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
)


def test_highlight_marks_tokens_and_escapes() -> None:
    out = highlight('def f(x: int) -> str:\n    return "<b>" + str(x)  # done\n', "python")
    assert '<span class="k">def</span> <span class="f">f</span>' in out
    assert (
        '<span class="s">&quot;&lt;b&gt;&quot;</span>' in out
        and '<span class="c"># done</span>' in out
    )
    assert '<span class="k">SELECT</span>' in highlight("SELECT a FROM t -- x", "SQLite")
    assert highlight("<x>", "cobol") == "&lt;x&gt;"


def test_markdown_renders_only_safe_markup() -> None:
    out = render_markdown(
        f"## Title {PAYLOAD}\n\nText with `<code>` and **bold**.\n\n```python\nprint('{PAYLOAD}')\n"
    )
    assert "<script" not in out and "<img" not in out and "&lt;/script&gt;&lt;script&gt;" in out
    assert '<code class="inline">&lt;code&gt;</code>' in out and "<strong>bold</strong>" in out
    assert 'class="code cut"' in out  # the unclosed fence is shown as cut off


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A compared run whose answers, rationales and ids try to inject markup; with a chart."""
    answers = {
        "teacher": {i: CASES[i][0] for i in IDS},
        "base": {i: CASES[i][1] + f"\n\nNote: {PAYLOAD}\n\n```html\n{PAYLOAD}\n```\n" for i in IDS},
        "distilled": dict(BROKEN),
    }
    rd = write_run(tmp_path_factory.mktemp("report") / "run", answers)
    rd.visuals.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["teacher", "base", "distilled"], [9.1, 4.2, 7.0])
    fig.savefig(rd.visuals / "model_scorecard.png", dpi=60)
    plt.close(fig)
    (rd.visuals / "notes.png").write_text("not really a png")

    def judge(items: list, cfg: object) -> dict:
        result = canned_judge()(items, cfg)
        result["prompts"][IDS[0]]["single"]["base"]["rationale"] = f"Mixed. {PAYLOAD}"
        return result

    compare_run(rd.root, CompareConfig(timeout_s=10.0, jobs=2), judge_fn=judge, echo=lambda s: None)
    return rd


def test_report_is_self_contained_and_escaped(report_run: Any) -> None:
    html = report_run.report.read_text()
    assert (
        f'content="{CSP}"' in html and "script-src" not in CSP
    )  # default-src 'none' forbids scripts
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;img src=x onerror=" in html and "Mixed. &lt;/script&gt;" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(\s*['"]?https?:|@import""", html)
    assert html.count('src="data:image/png;base64,') == 1  # the chart; the fake .png is skipped
    assert html.count('class="col"') + html.count('class="col missing"') == 12
    assert "Self-preference bias" in html and "tests 8/8" in html and 'class="badge pass"' in html
    assert 'class="badge fail"' in html and 'class="badge error"' in html and "cut off" in html


def test_metrics_only_report_says_where_its_scores_come_from(tmp_path: Path) -> None:
    rd = write_run(
        tmp_path / "run",
        {"teacher": {IDS[2]: CASES[IDS[2]][0]}, "base": {IDS[2]: CASES[IDS[2]][1]}},
    )
    compare_run(rd.root, CompareConfig(judge="none", timeout_s=10.0), echo=lambda s: None)
    html = rd.report.read_text()
    assert "No LLM judge scores (judge disabled with --judge none)" in html
    assert "Scorecard (from metrics)" in html and "Self-preference" not in html
    assert "No answer for this prompt." in html


# ---- headless Chromium over the DevTools protocol --------------------------------------------


class WebSocket:
    """Just enough RFC 6455 for DevTools: masked text frames out, (fragmented) frames in."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(4096)
        head, self.buf = data.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        n = len(data)
        head = bytearray([0x81])
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        mask = os.urandom(4)
        self.sock.sendall(bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("DevTools closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> dict[str, Any]:
        message = b""
        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7F
            n = int.from_bytes(self._read(2 if n == 126 else 8), "big") if n >= 126 else n
            payload = self._read(n)
            if b1 & 0x0F == 0x8:
                raise EOFError("close frame")
            message += payload
            if b1 & 0x80:
                return json.loads(message)


class Browser:
    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("chromium exited before DevTools started")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            url = m.group(1) if m else None
        assert url, "chromium did not print its DevTools address"
        self.ws, self.next_id, self.events = WebSocket(url), 0, []

    def call(
        self, method: str, params: dict | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(msg)
        while True:
            r = self.ws.recv()
            if r.get("id") == self.next_id:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r["result"]
            self.events.append(r)

    def open(self, url: str) -> str:
        """A fresh tab at ``url``, loaded; returns its session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=sid)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            sid,
        )
        self.call("Page.navigate", {"url": url}, sid)
        deadline = time.monotonic() + 60
        while not any(
            e.get("method") == "Page.loadEventFired" and e.get("sessionId") == sid
            for e in self.events
        ):
            assert time.monotonic() < deadline, "page did not load"
            self.events.append(self.ws.recv())
        self.call("Runtime.evaluate", {"expression": "1"}, sid)  # flush events queued during load
        return sid

    def errors(self, sid: str) -> list[str]:
        out = []
        for e in self.events:
            if e.get("sessionId") != sid:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def evaluate(self, sid: str, js: str) -> Any:
        return self.call("Runtime.evaluate", {"expression": js, "returnByValue": True}, sid)[
            "result"
        ].get("value")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


LAYOUT_JS = """JSON.stringify({
  pwned: document.body.getAttribute('data-pwned'),
  scripts: document.querySelectorAll('script, img[onerror]').length,
  sections: [...document.querySelectorAll('section.prompt')].map(s =>
    [...s.querySelectorAll(':scope > .cols > .col')].map(c => {
      const r = c.getBoundingClientRect(), st = getComputedStyle(c);
      return {model: c.dataset.model, x: r.left, y: r.top, w: r.width, h: r.height,
              shown: st.visibility === 'visible' && st.display !== 'none'};
    }))
})"""


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)
def test_report_in_headless_chromium(report_run: Any, tmp_path: Path) -> None:
    control = tmp_path / "control.html"
    control.write_text(
        report_run.report.read_text().replace(
            "</main>", "<script>console.error('control page script ran')</script></main>"
        )
    )
    plain = tmp_path / "plain.html"
    plain.write_text("<html><body><script>console.error('visible error')</script></body></html>")
    browser = Browser(tmp_path / "profile")
    try:
        # The capture works: a plain page's console.error is seen, and in the report the CSP
        # refuses an injected inline script (and that refusal is reported as an error).
        assert any("visible error" in e for e in browser.errors(browser.open(plain.as_uri())))
        ctl_errors = browser.errors(browser.open(control.as_uri()))
        assert ctl_errors and not any("control page script ran" in e for e in ctl_errors), (
            ctl_errors
        )
        assert any("Content Security Policy" in e for e in ctl_errors), ctl_errors

        sid = browser.open(report_run.report.as_uri())
        assert browser.errors(sid) == []
        layout = json.loads(browser.evaluate(sid, LAYOUT_JS))
        assert layout["pwned"] is None and layout["scripts"] == 0
        assert len(layout["sections"]) == 4
        for cols in layout["sections"]:
            assert [c["model"] for c in cols] == ["teacher", "base", "distilled"]
            assert all(c["shown"] and c["w"] > 300 and c["h"] > 50 for c in cols), cols
            assert cols[0]["x"] < cols[1]["x"] < cols[2]["x"]
            assert (
                max(c["y"] for c in cols) - min(c["y"] for c in cols) < 1
            )  # side by side, one row
        shot = base64.b64decode(
            browser.call("Page.captureScreenshot", {"format": "png"}, sid)["data"]
        )
    finally:
        browser.close()
    path = tmp_path / "report.png"
    path.write_bytes(shot)
    from PIL import Image

    img = Image.open(path).convert("L")
    assert img.size == (1400, 1000)
    lo, hi = img.getextrema()
    assert (
        hi - lo > 100 and len(img.getcolors(1 << 16) or []) > 20
    )  # text and colour, not a blank page

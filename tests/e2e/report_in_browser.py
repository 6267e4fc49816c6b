#!/usr/bin/env python3
"""The demo's run report in a real browser (ctest e2e.report_in_browser), with Debian's python3 and
chromium only:

  report_in_browser.py BINARY WORK [SCREENSHOT.png]

WORK is the demo pipeline's work folder (e2e.demo_pipeline). `crash-hpc report` writes the page
again from it, and bad inputs are refused with exit 2. Headless Chromium, driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: no port, no extra package), loads the page: no console
error, no exception, no failed resource; every figure decoded; the CRaSh table, the stage table and
each task's evaluation table there; then a full-page screenshot that is not blank and whose size is
the page's size. The screenshot is kept where asked (the README's image)."""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

failures = []


def check(ok, what):
    print(("ok:   " if ok else "FAIL: ") + what, flush=True)
    if not ok:
        failures.append(what)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium on PATH (env/setup.sh installs Debian's chromium)")


class Browser:
    """Headless Chromium and one page, over the DevTools protocol on fds 3 and 4 (NUL-terminated JSON)."""

    def __init__(self, profile):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def as_fds_3_and_4():
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
               "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""
        self.next_id = 0
        self.events = []
        self.session = None

    def _read_message(self, deadline):
        """The next message; TimeoutError when none comes before `deadline`."""
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.from_chrome], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"chromium closed the pipe:\n{err}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, params=None, session=True, timeout=60):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_for(self, method, timeout=60):
        deadline = time.time() + timeout
        for m in self.events:
            if m["method"] == method:
                return m
        while True:
            m = self._read_message(deadline)
            if "method" in m:
                self.events.append(m)
                if m["method"] == method:
                    return m

    def drain(self, seconds):
        """Events that arrive in the next `seconds` (late errors of a page)."""
        deadline = time.time() + seconds
        try:
            while True:
                m = self._read_message(deadline)
                if "method" in m:
                    self.events.append(m)
        except TimeoutError:
            pass

    def open_page(self):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def evaluate(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return r.get("result", {}).get("value")

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def png_pixels(data):
    """The screenshot as an array [height, width, channels] (Pillow: a dependency of python3-matplotlib)."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def report_job(binary, work, tmp):
    """crash-hpc report: writes the page; refuses what is not a work folder (exit 2, one line)."""
    page = os.path.join(tmp, "report.html")
    r = subprocess.run([binary, "report", "--work", work, "--out", page], capture_output=True, text=True)
    check(r.returncode == 0 and os.path.getsize(page) > 50_000, f"crash-hpc report writes the page ({r.stderr[-300:]})")
    for args, expect in ((["--work", os.path.join(tmp, "absent")], "is not a folder"),
                         (["--work", tmp], "not a pipeline work folder"),
                         (["--work", work, "--out", os.path.join(tmp, "no", "such", "r.html")], "does not exist")):
        r = subprocess.run([binary, "report"] + args, capture_output=True, text=True)
        check(r.returncode == 2 and expect in r.stderr, f"report {' '.join(args[-2:])}: exit 2, '{expect}' "
              f"(got {r.returncode}: {r.stderr.strip()[-200:]})")


def browse(page, work, screenshot_out):
    with tempfile.TemporaryDirectory() as profile:
        browser = Browser(profile)
        try:
            browser.open_page()
            width = 1280
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            browser.send("Page.navigate", {"url": "file://" + os.path.abspath(page)})
            browser.wait_for("Page.loadEventFired")
            browser.drain(1.0)
            problems = []
            for e in browser.events:
                p = e.get("params", {})
                if e["method"] == "Runtime.exceptionThrown":
                    problems.append("exception: " + p["exceptionDetails"].get("text", ""))
                elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    problems.append("console error: " + " ".join(str(a.get("value", "")) for a in p.get("args", [])))
                elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                    problems.append("log error: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
                elif e["method"] == "Network.loadingFailed":
                    problems.append("failed resource: " + p.get("errorText", ""))
                elif e["method"] == "Network.responseReceived" and p["response"].get("status", 200) >= 400:
                    problems.append(f"resource status {p['response']['status']}: {p['response'].get('url')}")
            check(not problems, "no console errors, exceptions or failed resources" + "".join(
                "\n      " + x for x in problems))
            requests = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
            outside = [u for u in requests if not (u.startswith("file://") or u.startswith("data:"))]
            check(not outside, f"nothing fetched from a network ({outside[:3]})")

            images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            check(len(images) >= 5, f"the figures are there ({len(images)}: {[i[2] for i in images]})")
            check(all(c and w > 100 for c, w, _ in images), "every figure decoded")
            for what, selector, least in (("CRaSh table", "#crash table", 1), ("stage table", "#stages table", 1),
                                          ("evaluation tables", "#eval table", 2), ("model table", "#models table", 1),
                                          ("settings", "#settings table", 1)):
                n = browser.evaluate(f"document.querySelectorAll('{selector}').length")
                check(n >= least, f"{what}: {n} table(s)")
            text = browser.evaluate("document.body.innerText")
            for expected in ("Plug-in", "±", "crash-hpc", "LibTorch", "uniform", "remove", "share"):
                check(expected in text, f"the page says '{expected}'")
            links = browser.evaluate("Array.from(document.links).map(a => a.href)")
            details = [u for u in links if u.endswith(".details.jsonl")]
            check(len(details) >= 10 and all(os.path.exists(u[len("file://"):]) for u in details),
                  f"each evaluation links its details.jsonl ({len(details)} links, all present)")
            logs = [u for u in links if u.endswith(".log")]
            check(logs and all(os.path.exists(u[len("file://"):]) for u in logs), f"stage logs linked ({len(logs)})")

            metrics = browser.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            page_w, page_h = int(round(size["width"])), int(round(size["height"]))
            shot = browser.send("Page.captureScreenshot",
                                {"format": "png", "captureBeyondViewport": True,
                                 "clip": {"x": 0, "y": 0, "width": page_w, "height": page_h, "scale": 1}})
            data = base64.b64decode(shot["data"])
        finally:
            browser.close()
    pixels = png_pixels(data)
    h, w = pixels.shape[:2]
    check((w, h) == (page_w, page_h), f"screenshot {w}x{h} is the page's size {page_w}x{page_h}")
    check(h > 2000, f"the page is long enough to hold the report ({h} px)")
    # Ink: dark pixels (text, table rules, figures). A blank or unstyled-empty page has next to none.
    ink = (pixels.astype(int).sum(axis=2) < 3 * 160).mean()
    colours = len({tuple(p) for p in pixels[::4, ::4].reshape(-1, 3)})
    check(ink > 0.02 and colours > 200, f"screenshot not blank: {ink:.1%} of pixels are ink, {colours} colours")
    if screenshot_out:
        with open(screenshot_out, "wb") as f:
            f.write(data)
        print(f"screenshot: {screenshot_out} ({w}x{h}, {len(data) / 1024:.0f} KiB)")


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    binary, work = sys.argv[1], sys.argv[2]
    screenshot = sys.argv[3] if len(sys.argv) == 4 else None
    check(os.path.exists(os.path.join(work, "report.html")), "the demo pipeline (pipeline --report) wrote report.html")
    with tempfile.TemporaryDirectory() as tmp:
        report_job(binary, work, tmp)
        # The page is read where the pipeline wrote it: its links are relative to the work folder.
        browse(os.path.join(work, "report.html"), work, screenshot)
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("all checks passed")


if __name__ == "__main__":
    main()

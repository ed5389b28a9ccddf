"""The documentation site: ``mkdocs build --strict``, then the pages in a real headless Chromium.

The site is built into a temporary folder and served on 127.0.0.1; Chromium is driven over the
DevTools protocol. The home page, the API page of ``lstm`` and the rendered notebook must show
their content, find ``reset_state`` with the search box and log no console error; a screenshot
of each is written to the test's ``tmp_path``. Without the docs extra (``pip install
'jax_lstm[docs]'``) or without ``chromium`` on the PATH the tests skip, saying which is missing.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install 'jax_lstm[docs]'")

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT.parent / "shared" / "design" / "API.md"
API_MODULES = ("jax_lstm", "layers", "interop", "nnx", "linen", "eqx", "parallel", "checkpoint")
# The public names of the API contract; API.md, where present, adds whatever else it names.
CONTRACT = (
    "LSTMParams", "LSTMState", "LayerNormParams", "init_params", "zeros_state", "lstm_cell", "lstm_ref", "lstm",
    "lstm_trace", "init_stack", "lstm_stack", "gate_trace_stack", "from_torch", "to_torch", "from_keras",
    "from_flax", "from_haiku", "from_equinox", "to_equinox", "nnx.LSTM", "linen.LSTM", "eqx.LSTM",
    "LSTM.from_params", "LSTM.to_params", "LSTM.step", "LSTM.initialize_carry", "to_variables", "from_variables",
)  # fmt: skip
PAGES = {"home": "", "api": "api/jax_lstm/", "notebook": "notebooks/manual_vs_autodiff/"}
# what each screenshot shows: the top of the home page, the entry of lstm, the notebook's first figure
SHOTS = {"home": None, "api": "[id='jax_lstm.lstm']", "notebook": ".jp-OutputArea-output img"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    return out


def _ids(site: Path) -> set[str]:
    ids: set[str] = set()
    for module in API_MODULES:
        ids |= set(re.findall(r'id="(jax_lstm[\w.]*)"', (site / "api" / module / "index.html").read_text()))
    return ids


def _public_paths() -> set[str]:
    """Every public object of the API modules and every public method of their classes (griffe, no import)."""
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed: pip install 'jax_lstm[docs]'")
    package = griffe.load("jax_lstm", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    paths = set()
    for module in API_MODULES:
        mod = package if module == "jax_lstm" else package[module]
        for name, member in mod.members.items():
            if not member.is_public or member.is_module or member.is_alias and not member.resolved:
                continue
            paths.add(f"{mod.path}.{name}")
            if member.is_class:
                for mname, m in member.members.items():
                    if m.is_function and not mname.startswith("_"):
                        paths.add(f"{mod.path}.{name}.{mname}")
    return paths


def _api_names() -> set[str]:
    names = set(CONTRACT)
    if API_MD.exists():
        text = API_MD.read_text()
        code = " ".join(re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text))
        names |= set(re.findall(r"[A-Za-z_][\w.]*", code))
    return names


def test_every_api_name_has_a_reference_entry(site):
    ids, public = _ids(site), _public_paths()
    needed: dict[str, list[str]] = {}
    for name in _api_names():
        name = name.removeprefix("jax_lstm.")
        hits = [p for p in public if p == f"jax_lstm.{name}" or p.endswith(f".{name}")]
        if hits:
            needed[name] = hits
    assert set(CONTRACT) <= set(needed), set(CONTRACT) - set(needed)
    missing = {name: [p for p in hits if p not in ids] for name, hits in needed.items()}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_every_public_docstring_has_an_example():
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed: pip install 'jax_lstm[docs]'")
    package = griffe.load("jax_lstm", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    lacking = []
    for module in API_MODULES:
        mod = package if module == "jax_lstm" else package[module]
        for name, member in mod.members.items():
            if not member.is_public or not (member.is_function or member.is_class):
                continue
            doc = member.docstring.value if member.docstring else ""
            if not re.search(r"^Examples?:\s*$", doc, flags=re.M):
                lacking.append(f"{mod.path}.{name}")
    assert not lacking, f"public docstrings without an Example: section: {lacking}"


def test_search_index_has_reset_state(site):
    docs = json.loads((site / "search" / "search_index.json").read_text())["docs"]
    where = {d["location"].split("#")[0] for d in docs if "reset_state" in d["text"] or "reset_state" in d["title"]}
    assert "api/jax_lstm/" in where and "options/" in where, sorted(where)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class DevTools:
    """A minimal Chrome DevTools protocol client for one page: commands, and the events seen meanwhile."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, (method, msg["error"])
                return msg["result"]
            self.events.append(msg)

    def pump(self, seconds: float):
        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except Exception:
            pass
        finally:
            self.ws.settimeout(30)

    def wait_event(self, method: str, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(e.get("method") == method for e in self.events):
                return
            self.pump(0.2)
        raise AssertionError(f"no {method} within {timeout} s")

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            self.pump(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client (the docs extra) is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900",
            "about:blank"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < end:
            assert proc.poll() is None, "chromium exited at start-up"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        from urllib.request import urlopen

        end = time.monotonic() + 10
        while True:
            pages = [t for t in json.load(urlopen(f"http://127.0.0.1:{port}/json/list")) if t["type"] == "page"]
            if pages or time.monotonic() > end:
                break
            time.sleep(0.1)
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _open(tools: DevTools, url: str):
    tools.events.clear()
    tools.send("Page.navigate", url=url)
    tools.wait_event("Page.loadEventFired")
    tools.wait_js("document.readyState === 'complete'")


def _search(tools: DevTools, query: str) -> list[str]:
    """Type ``query`` into the search box; return the titles of the results it shows."""
    tools.js("document.querySelector('label.md-search__icon, label[for=__search]').click(); true")
    tools.js("document.querySelector('input[data-md-component=search-query]').focus(); true")
    tools.send("Input.insertText", text=query)
    tools.wait_js("document.querySelectorAll('.md-search-result__item').length > 0")
    return tools.js(
        "Array.from(document.querySelectorAll('.md-search-result__item .md-search-result__article h1,"
        " .md-search-result__item .md-search-result__article h2')).map(e => e.innerText)"
    )


def _screenshot(tools: DevTools, path: Path, selector: str | None):
    """A PNG of the viewport, scrolled to ``selector`` (the top of the page when None)."""
    if selector is None:
        tools.js("window.scrollTo(0, 0); true")
    else:
        tools.js(f"document.querySelector({json.dumps(selector)}).scrollIntoView(); window.scrollBy(0, -60); true")
    tools.pump(0.3)
    data = tools.send("Page.captureScreenshot", format="png")["data"]
    path.write_bytes(base64.b64decode(data))
    assert path.stat().st_size > 10_000


def test_pages_render_search_and_log_no_error(server, browser, tmp_path):
    tools = browser
    checks = {
        "home": "document.title.includes('jax_lstm') && document.body.innerText.includes('Headline numbers')",
        # the entry of lstm: its heading, its signature with the keyword-only arguments, its example
        "api": """(() => { const h = document.getElementById('jax_lstm.lstm'); if (!h) return false;
                   const entry = h.closest('.doc-object'); const sig = entry.querySelector('.doc-signature');
                   return sig !== null && /lstm\\(\\s*params,\\s*xs,\\s*state0=None/.test(sig.innerText)
                          && sig.innerText.includes('reset_state=None') && sig.innerText.includes('time_major=True')
                          && entry.innerText.includes('(T, B, D)') && entry.innerText.includes('Example'); })()""",
        # the committed outputs: a printed cell output and a figure
        "notebook": """document.querySelectorAll('.jp-OutputArea-output').length > 5
                       && document.querySelector('.jp-OutputArea-output img') !== null
                       && document.body.innerText.includes('rules the seed gets wrong')""",
    }
    for name, path in PAGES.items():
        _open(tools, server + path)
        assert tools.wait_js(checks[name]), name
        _screenshot(tools, tmp_path / f"{name}.png", SHOTS[name])
        titles = _search(tools, "reset_state")
        assert any("reset_state" in t or "lstm" in t for t in titles), (name, titles)
        tools.pump(0.3)
        assert not tools.errors(), (name, tools.errors())
    # a query in the address (?q=) opens the search with its results too
    _open(tools, server + "?q=reset_state")
    tools.wait_js("document.querySelectorAll('.md-search-result__item').length > 0")
    assert not tools.errors(), tools.errors()

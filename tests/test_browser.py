"""What people look at, in a real browser: headless Chromium (driven by Playwright) against a real
`bentoml serve`, the combined report, Locust's and optuna-dashboard's web UIs.

Screenshots go to reports/screenshots/ (git-ignored; $LAB_SCREENSHOTS elsewhere) for a person to look at.
Chromium comes from the system (`make test` installs Debian's `chromium` with apt-get when it runs as
root); where there is none, or no playwright package, every test here skips and says why.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import requests

from bench.server import Server
from tests.conftest import REPO, SHARED_DATA, has_real_cifar
from tests.images import broken

SHOTS = Path(os.environ.get("LAB_SCREENSHOTS") or REPO / "reports" / "screenshots")
LAPTOP = {"width": 1366, "height": 768}
# Chromium as root, headless, on a closed network: no sandbox, no GPU, no background traffic.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
LOCAL = ("http://127.0.0.1:", "http://localhost:", "file://", "data:", "blob:", "about:")


def find_chromium() -> str | None:
    for c in (os.environ.get("LAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if c and (path := shutil.which(c)):
            return path
    return None


def why_no_browser() -> str | None:
    if find_chromium() is None:
        return ("no Chromium on this machine: `make test` installs Debian's `chromium` with apt-get when it runs "
                "as root (or set LAB_CHROMIUM=/path/to/chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (make setup installs requirements.lock)"
    return None


# decided before any fixture runs, so that the session's model store and server are not built for nothing
pytestmark = pytest.mark.skipif(why_no_browser() is not None, reason=str(why_no_browser()))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    pw = sync_playwright().start()
    try:  # Playwright gives the browser a fresh temporary profile (--user-data-dir) and removes it after
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


class Page:
    """A fresh browser page that records console errors, uncaught exceptions and blocked requests.
    Nothing leaves this machine: requests to any other host are aborted (and listed in `blocked`)."""

    def __init__(self, browser, viewport=LAPTOP):
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.context.route("**/*", self._route)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith(LOCAL):
            return route.continue_()
        self.blocked.append(url)
        return route.abort()

    def _console(self, msg):
        if msg.type != "error":
            return
        where = (msg.location or {}).get("url", "")
        if where and not where.startswith(LOCAL) or any(where == b for b in self.blocked):
            return  # a request this test blocked on purpose
        if "net::ERR_FAILED" in msg.text and self.blocked:
            return
        self.errors.append(f"console: {msg.text} ({where})")

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = SHOTS / name
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def overflow_x(self) -> int:
        """How many pixels the page is wider than the window (0: no sideways scrolling)."""
        return self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.close()


# ---------------------------------------------------------------- the try-it page


def models(server) -> dict:
    return requests.get(f"{server.url}/models/", timeout=10).json()


def open_tryit(page: Page, server):
    page.page.goto(f"{server.url}/")
    page.page.wait_for_selector("body[data-ready]", timeout=30_000)


def answers_on_page(page: Page) -> dict[str, dict]:
    """backend -> what the page shows for the first image: status, labels, probabilities, error text."""
    return page.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
        'article.result:first-of-type table.answers tbody tr')].map(tr => [tr.dataset.backend, {
          status: Number(tr.dataset.status),
          labels: [...tr.querySelectorAll('li')].map(li => li.dataset.label),
          probs: [...tr.querySelectorAll('li')].map(li => Number(li.dataset.probability)),
          batch: tr.querySelector('td.batch') ? tr.querySelector('td.batch').textContent : null,
          error: tr.querySelector('.error-text') ? tr.querySelector('.error-text').textContent : null,
          shown: tr.innerText}]))""")


def upload(page: Page, path: Path) -> None:
    page.page.evaluate("document.querySelector('#results').removeAttribute('data-done')")
    page.page.set_input_files("#file", str(path))
    page.page.wait_for_selector("#results[data-done]", timeout=60_000)


def test_tryit_page_loads_with_the_model_card_and_no_console_errors(page, browser, server):
    info = models(server)
    open_tryit(page, server)
    p = page.page
    assert p.title() == "Model lab: try it"
    assert p.input_value("#model") == info["default"]
    served = info["models"][info["default"]]
    boxes = p.eval_on_selector_all("#backends input:not([disabled])", "els => els.map(e => e.value)")
    assert boxes == served["backends"]
    card = p.inner_text("#card")
    acc = served["card"]["metrics"]["test_accuracy"]
    assert f"{100 * acc:.2f}%" in card and f"{served['card']['parameters']:,}" in card
    for heading in ("Per-class accuracy", "Export parity", "INT8 cost", "FLOPs per image"):
        assert heading in card, heading
    # the bundled CIFAR-10 samples, all loaded
    widths = p.eval_on_selector_all("#samples img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 10 and all(w > 0 for w in widths), widths
    assert page.overflow_x() == 0
    page.shot("tryit.png")
    narrow = Page(browser, {"width": 800, "height": 900})  # a small window: one column, still no sideways scroll
    try:
        open_tryit(narrow, server)
        assert narrow.overflow_x() == 0
        narrow.shot("tryit-narrow.png")
        assert narrow.errors == []
    finally:
        narrow.close()
    assert page.errors == [], page.errors


def test_an_image_uploaded_through_the_page_gets_the_apis_answer_on_every_backend(page, server, tmp_path):
    if has_real_cifar():
        src = sorted((SHARED_DATA / "cifar10-jpg" / "test" / "ship").glob("*.jpg"))[7]
    else:
        src = REPO / "serving" / "static" / "samples" / "ship.jpg"
    image = tmp_path / "my ship.jpg"
    image.write_bytes(src.read_bytes())
    open_tryit(page, server)
    page.page.fill("#top_k", "5")
    upload(page, image)
    shown = answers_on_page(page)
    backends = models(server)["models"]["cifar10-airbench-smoke"]["backends"]
    assert sorted(shown) == sorted(backends)
    for backend in backends:
        r = requests.post(f"{server.url}/classify", params={"backend": backend, "top_k": 5},
                          files={"image": (image.name, image.read_bytes(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        api = r.json()["predictions"]
        got = shown[backend]
        assert got["status"] == 200, got
        assert got["labels"] == [a["label"] for a in api], (backend, got, api)
        assert got["probs"] == pytest.approx([a["probability"] for a in api], abs=1e-5), backend
        assert int(got["batch"]) >= 1
    assert "null" not in page.page.inner_text("#results") and "undefined" not in page.page.inner_text("#results")
    example = page.page.inner_text("#example")  # the request as a command, the file name quoted for a shell
    assert "curl -F 'image=@my ship.jpg'" in example and "/classify?backend=" in example, example
    verdict = page.page.inner_text("article.result .agree")
    assert "agree" in verdict or "disagree" in verdict
    page.shot("tryit-result.png")
    assert page.errors == [], page.errors


def test_the_bundled_samples_go_as_one_batch(page, server):
    open_tryit(page, server)
    page.page.click("#all-samples")
    page.page.wait_for_selector("#results[data-done]", timeout=60_000)
    rows = page.page.eval_on_selector_all(".overview tbody tr", "trs => trs.map(tr => tr.innerText)")
    assert len(rows) == 10
    assert "POST /classify_batch with 10 images" in page.page.inner_text("#results")
    assert page.page.eval_on_selector_all("article.result", "a => a.length") == 10
    assert "HTTP" not in "\n".join(rows)  # every image answered on every backend
    page.shot("tryit-batch.png")
    assert page.errors == [], page.errors


def test_a_corrupt_file_shows_the_services_own_error(page, server, tmp_path):
    data, ctype, status = broken()["corrupt_png"]
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(data)
    api = requests.post(f"{server.url}/classify", files={"image": (bad.name, data, ctype)}, timeout=30)
    assert api.status_code == status
    open_tryit(page, server)
    upload(page, bad)
    shown = answers_on_page(page)
    assert shown, "no answer rows"
    for backend, got in shown.items():
        assert got["status"] == status, (backend, got)
        assert got["error"] == api.json()["error"], (backend, got)
        assert f"HTTP {status}" in got["shown"]
    page.shot("tryit-error.png")
    # the browser's own log has the 400 responses; nothing else may be in it
    assert all("status of 400" in e for e in page.errors), page.errors


def test_bentoml_docs_page_still_reachable(page, server):
    page.page.goto(f"{server.url}/docs")
    page.page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
    paths = page.page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
    assert "/classify" in paths and "/classify_batch" in paths, paths
    page.shot("docs.png")
    assert page.errors == [], page.errors  # (BentoML's page asks Google Tag Manager: blocked, not counted)


# ---------------------------------------------------------------- reports


def test_combined_report_renders_with_all_images_and_a_working_toc(page, combined_report):
    html = combined_report / "report.html"
    p = page.page
    p.goto(html.as_uri())
    p.wait_for_load_state("load")
    images = p.eval_on_selector_all("main img", "imgs => imgs.map(i => [i.alt, i.complete ? i.naturalWidth : 0])")
    assert len(images) >= 5, images  # training curves, confusion, accuracy plots, latency vs throughput
    assert all(w > 0 for _, w in images), images
    assert all(src.startswith("data:") for src in p.eval_on_selector_all("img", "i => i.map(x => x.src)"))
    links = p.eval_on_selector_all("nav.toc a", "as => as.map(a => a.getAttribute('href'))")
    assert len(links) >= 6
    missing = p.evaluate("hrefs => hrefs.filter(h => !document.getElementById(h.slice(1)))", links)
    assert missing == [], missing
    # every ## section names the command that produced it
    without = p.evaluate("""() => [...document.querySelectorAll('main h2')].filter(h =>
        !(h.nextElementSibling && h.nextElementSibling.matches('p.cmd'))).map(h => h.textContent)""")
    assert without == [], without
    assert page.overflow_x() == 0  # wide tables scroll inside the page, not the page itself
    page.shot("report.png", full_page=False)
    page.shot("report-full.png")
    for target in (links[len(links) // 2], links[-1]):  # following a TOC link brings its section into view
        p.click(f"nav.toc a[href='{target}']")
        p.wait_for_function("""h => { const r = document.getElementById(h.slice(1)).getBoundingClientRect();
            return location.hash === h && r.top >= -1 && r.bottom <= window.innerHeight; }""", arg=target,
                            timeout=5000)
    assert page.errors == [], page.errors


def test_study_report_renders_with_all_images_and_a_working_toc(page, smoke_studies):
    p = page.page
    p.goto((smoke_studies["out"] / "report.html").as_uri())
    p.wait_for_load_state("load")
    images = p.eval_on_selector_all("main img", "imgs => imgs.map(i => [i.alt, i.complete ? i.naturalWidth : 0])")
    from tests.test_studies import STAGE_FILES

    assert len(images) >= sum(len(f) for f in STAGE_FILES.values()), images  # every stage's plots
    assert all(w > 0 for _, w in images), images
    links = p.eval_on_selector_all("nav.toc a", "as => as.map(a => a.getAttribute('href'))")
    assert len(links) >= 7
    missing = p.evaluate("hrefs => hrefs.filter(h => !document.getElementById(h.slice(1)))", links)
    assert missing == [], missing
    without = p.evaluate("""() => [...document.querySelectorAll('main h2')].filter(h =>
        !(h.nextElementSibling && h.nextElementSibling.matches('p.cmd'))).map(h => h.textContent)""")
    assert without == [], without  # every stage's section names the command that reproduces it
    assert page.overflow_x() == 0
    page.shot("study-report.png", full_page=False)
    page.shot("study-report-full.png")
    assert page.errors == [], page.errors


# ---------------------------------------------------------------- dashboards


def test_locust_web_ui_runs_and_shows_accuracy(page, server, store):
    locust = str(Path(sys.executable).with_name("locust"))
    ui = Server(store["env"], store["root"] / "locust-ui.log",
                cmd=[locust, "-f", "bench/locustfile.py", "--host", server.url, "--web-host", "127.0.0.1",
                     "--web-port", "{port}", "--backends", "onnx", "--images", "20",
                     "--data-root", str(store["data"])], ready_path="/")
    try:
        p = page.page
        p.goto(ui.url)
        p.fill("input[name=userCount]", "2")
        p.fill("input[name=spawnRate]", "2")
        p.click("button[type=submit]:has-text('Start')")
        p.get_by_role("tab", name="Statistics").wait_for(timeout=20_000)
        p.wait_for_function("""() => [...document.querySelectorAll('tr')].some(tr =>
            tr.innerText.includes('classify[onnx]') && Number(tr.innerText.split('\\t')[2]) > 20)""",
                            timeout=60_000)
        page.shot("locust.png", full_page=False)
        p.get_by_role("tab", name="Accuracy").click()
        row = p.locator("tr", has_text="onnx").first
        row.wait_for(timeout=20_000)
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == "onnx" and int(cells[1]) > 0 and cells[3].endswith("%"), cells
        tally = requests.get(f"{ui.url}/accuracy", timeout=10).json()
        assert tally[0]["backend"] == "onnx" and tally[0]["checked"] > 0
        page.shot("locust-accuracy.png", full_page=False)
        p.click("button:has-text('Stop')")
        assert page.errors == [], page.errors
    finally:
        ui.stop()


def test_optuna_dashboard_shows_a_study(page, tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (requirements.in lists it)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="browser-test-study", storage=storage, direction="maximize")
    study.optimize(lambda t: -(t.suggest_float("lr", 1e-3, 1.0, log=True) - 0.1) ** 2, n_trials=8)
    dashboard = str(Path(sys.executable).with_name("optuna-dashboard"))
    ui = Server(dict(os.environ), tmp_path / "dashboard.log",
                cmd=[dashboard, storage, "--host", "127.0.0.1", "--port", "{port}"], ready_path="/dashboard")
    try:
        p = page.page
        p.goto(f"{ui.url}/dashboard")
        p.get_by_text("browser-test-study").first.click()
        p.get_by_text(f"Best Trial (number={study.best_trial.number})").wait_for(timeout=30_000)
        # a trial run while the dashboard is open shows after a reload (lr = 0.1 is the objective's best)
        study.enqueue_trial({"lr": 0.1})
        study.optimize(lambda t: -(t.suggest_float("lr", 1e-3, 1.0, log=True) - 0.1) ** 2, n_trials=1)
        p.reload()
        p.get_by_text("Best Trial (number=8)").wait_for(timeout=30_000)
        p.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')].some(
            plot => (plot.data || []).some(trace => (trace.x || []).length === 9))""", timeout=30_000)
        p.wait_for_timeout(500)  # let Plotly draw what it has
        page.shot("optuna-dashboard.png")
        assert page.errors == [], page.errors
    finally:
        ui.stop()

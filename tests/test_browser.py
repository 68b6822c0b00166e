"""The audit as a reviewer sees it: `mlflow server` on loopback over a finished tiny pipeline, read in
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium).

The pipeline run's page must state the verdict, its reasons and where the report is; the report must
show the verdict, the figure tables and their pictures, without broken images, console errors or a
page wider than the window, in MLflow's artifact pane (about 500 px) and on its own at 500 and
1400 px. Screenshots go to a temporary folder, or to ``$MEDSYNTH_SCREENSHOTS`` when set (how the
pictures of docs/review-guide.md are made). Chromium reaches only 127.0.0.1: every other host name
fails to resolve, so a page that needs the internet shows it as an error here.

The tests skip only where Chromium or its driver cannot start, and say what failed; `make tools`
installs both (CI runs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import TINY, compose_config, run_stage
from tests.servers import free_port, serve_tracking, stop, wait_until_healthy

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

REPORT = "evaluation/report.html"
PANE = 500  # the width of MLflow's artifact pane the report must fit
WAIT = 60.0  # seconds to wait for the React UI to render what a test looks for


def _executable(name: str) -> str:
    """Debian's path of ``name``; the explicit driver path keeps Selenium Manager from fetching a driver."""
    return shutil.which(name) or f"/usr/bin/{name}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (started first: without it, nothing else here is worth building)."""
    options = webdriver.ChromeOptions()
    options.binary_location = _executable("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                     "--force-device-scale-factor=1", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-extensions", "--lang=en-US",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = _executable("chromedriver")
    for path in (options.binary_location, driver_path):
        if not os.access(path, os.X_OK):
            pytest.skip(f"headless Chromium cannot start: {path} is missing (install Debian's chromium and "
                        "chromium-driver: make tools)")
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except (WebDriverException, OSError) as err:
        pytest.skip(f"headless Chromium cannot start ({options.binary_location} driven by {driver_path}): "
                    f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def pipeline(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished tiny `medsynth run` (2D, so the report has its picture sheets), its runs and its verdict."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config([*TINY, f"paths.output={root / 'out'}", f"mlflow.tracking_uri={uri}"])
    run_id = run_stage("run", cfg)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    evaluate = next(c for c in children if c.data.tags["medsynth.stage"] == "evaluate")
    audit = json.loads((root / "out" / "evaluation" / "metrics.json").read_text())
    return SimpleNamespace(root=root, uri=uri, run_id=run_id, experiment_id=parent.info.experiment_id,
                           evaluate_id=evaluate.info.run_id, audit=audit, report=root / "out" / REPORT)


@pytest.fixture(scope="module")
def server(pipeline: SimpleNamespace) -> Iterator[str]:
    """`mlflow server` over the pipeline's store on a free loopback port; its base URL."""
    port, log = free_port(), pipeline.root / "mlflow-server.log"
    process = serve_tracking(pipeline.uri, port=port, log_path=log, cwd=pipeline.root)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, process, log)
        yield base
    finally:
        stop(process)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: ``$MEDSYNTH_SCREENSHOTS`` when set, else a temporary folder."""
    chosen = os.environ.get("MEDSYNTH_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- the browser's side --------------------------------------------------------------------------------

# MLflow's own noise, the only console errors let through (everything else fails the test):
# - its UI asks the server who is logged in (GET /ajax-api/2.0/mlflow/users/current); a server without
#   authentication answers 404, which the UI takes as "no user";
# - its bundle's layout code logs "ResizeObserver loop completed with undelivered notifications" when a
#   panel changes size (the browser's warning that a resize callback ran late; nothing fails to render).
_MLFLOW_NOISE = re.compile(r"/ajax-api/2\.0/mlflow/users/current - Failed to load resource: .* 404"
                           r"|/static-files/static/js/\S+ .*ResizeObserver loop completed with undelivered notifications")


def console_errors(driver: Any) -> list[str]:
    """The console's errors since the last call (reading the log empties it), less MLflow's own noise."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not _MLFLOW_NOISE.search(entry["message"])]


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Make the page's viewport ``width`` x ``height`` CSS pixels (the window's frame, if any, added)."""
    driver.set_window_size(width, height)
    extra_w, extra_h = driver.execute_script("return [window.outerWidth - window.innerWidth, "
                                             "window.outerHeight - window.innerHeight]")
    if extra_w or extra_h:
        driver.set_window_size(width + extra_w, height + extra_h)


def close_assistant(driver: Any) -> None:
    """Close MLflow's assistant side panel when it is open (it opens by itself on a first visit and narrows the page)."""
    for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='MLflow Assistant']"
                                                 "/ancestor::*[.//button[@aria-label='Close']][1]//button[@aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def words(text: str) -> str:
    """``text`` with its runs of white space made one space."""
    return " ".join(text.split())


_LAYOUT = """
const doc = document.documentElement, rect = e => e.getBoundingClientRect();
const verdict = document.querySelector('div.verdict');
const tables = [...document.querySelectorAll('table.figures')];
const width = cells => cells.length ? Math.min(...cells.map(c => rect(c).width)) : 0;
return {
  scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
  verdict: verdict ? verdict.innerText : '',
  verdictShown: verdict ? rect(verdict).width > 0 && rect(verdict).height > 0 : false,
  tables: tables.length,
  tableWidth: width(tables),
  tablesPastEdge: tables.filter(t => rect(t).right > doc.clientWidth + 1).length,
  figures: [...document.querySelectorAll('table.figures tr.figure')].map(r => r.id),
  meaningWidth: width([...document.querySelectorAll('table.figures tr.meaning td')]),
  nameWidth: width([...document.querySelectorAll('table.figures td.name')]),
  images: [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 22), complete: i.complete,
                                          natural: i.naturalWidth, shown: rect(i).width, right: rect(i).right})),
};
"""


def check_report(driver: Any, audit: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Check the report open in ``driver``'s current frame against ``audit`` (its metrics.json); its layout."""
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && [...document.images].every(i => i.complete)"))
    layout = driver.execute_script(_LAYOUT)
    verdict = "PASS" if audit["verdict"]["passed"] else "FAIL"
    assert layout["verdictShown"] and layout["verdict"].startswith(f"Verdict. {verdict}"), (where, layout["verdict"])
    groups = list(dict.fromkeys(name.split("/", 1)[0] for name in audit["metrics"]))
    assert layout["tables"] == len(groups), where
    assert layout["figures"] == list(audit["metrics"]), where  # every figure, in order, with its name as id
    # the pictures: both sheets of a 2D audit, inlined (they load wherever the page is opened), none broken
    assert len(layout["images"]) == 2, (where, layout["images"])
    for image in layout["images"]:
        assert image["src"] == "data:image/png;base64," and image["complete"] and image["natural"] > 0, (where, image)
        assert 0 < image["shown"] and image["right"] <= layout["clientWidth"] + 1, (where, image)
    # nothing wider than the window, and the figure tables read well in it
    assert layout["scrollWidth"] <= layout["clientWidth"] + 1, (where, layout)
    assert layout["tablesPastEdge"] == 0, where
    assert layout["meaningWidth"] >= 0.95 * layout["tableWidth"] and layout["meaningWidth"] >= 0.8 * min(
        layout["clientWidth"], 1000), (where, layout)  # each meaning spans its table: never a word per line
    assert layout["nameWidth"] >= 150, (where, layout)  # names wrap between words, not letter by letter
    return layout


# --- the tests ---------------------------------------------------------------------------------------------


def test_the_pipeline_run_page_states_the_verdict_and_where_the_report_is(
        pipeline: SimpleNamespace, server: str, browser: Any, shots: Path) -> None:
    set_viewport(browser, 1400, 900)
    browser.get(f"{server}/#/experiments/{pipeline.experiment_id}/runs/{pipeline.run_id}")
    WebDriverWait(browser, WAIT).until(lambda d: any(
        "Audit verdict" in (e.get_attribute("textContent") or "")
        for e in d.find_elements(By.CSS_SELECTOR, ".note-editor-preview-content")))
    close_assistant(browser)
    description = next(e for e in browser.find_elements(By.CSS_SELECTOR, ".note-editor-preview-content")
                       if "Audit verdict" in (e.get_attribute("textContent") or ""))
    text = words(description.get_attribute("textContent"))
    verdict = pipeline.audit["verdict"]
    assert f"Audit verdict: {'PASS' if verdict['passed'] else 'FAIL'}" in text, text
    for group in ("privacy", "realism", "utility"):
        assert f"{group} {'PASS' if verdict[group]['passed'] else 'FAIL'}" in text, text
    for reason in verdict["reasons"]:
        assert words(reason) in text, (reason, text)  # Markdown did not eat an underscore or a bracket
    assert pipeline.evaluate_id in text and str(pipeline.report) in text

    # the verdict is what the page shows first, with the link to the report in view
    headline = description.find_element(By.TAG_NAME, "strong")
    assert headline.is_displayed() and headline.text.startswith("Audit verdict")
    assert headline.rect["y"] < 400, headline.rect
    link = description.find_element(By.LINK_TEXT, REPORT)
    expected = f"{server}/#/experiments/{pipeline.experiment_id}/runs/{pipeline.evaluate_id}/artifacts/{REPORT}"
    assert link.get_attribute("href") == expected
    assert link.is_displayed() and link.rect["y"] < 600, link.rect
    for more in browser.find_elements(By.XPATH, "//*[self::button or self::a][normalize-space()='Show more']"):
        if more.is_displayed():  # the whole description, reasons included, for the screenshot
            more.click()
            break
    browser.save_screenshot(str(shots / "mlflow-run-description.png"))
    assert not console_errors(browser)


def test_the_report_reads_well_in_mlflows_artifact_pane(
        pipeline: SimpleNamespace, server: str, browser: Any, shots: Path) -> None:
    """The link of the description opens the report in the artifact pane; narrowed to about 500 px it still fits."""
    url = f"{server}/#/experiments/{pipeline.experiment_id}/runs/{pipeline.evaluate_id}/artifacts/{REPORT}"
    window = 1000
    for _ in range(3):  # find the window width whose artifact pane is about PANE px wide (the layout is MLflow's)
        set_viewport(browser, window, 900)
        browser.get(url)
        frame = WebDriverWait(browser, WAIT).until(
            lambda d: [f for f in d.find_elements(By.CSS_SELECTOR, "iframe") if f.size["width"] > 0])[0]
        close_assistant(browser)
        pane = browser.execute_script("return arguments[0].getBoundingClientRect().width", frame)
        if abs(pane - PANE) <= 20:
            break
        window += round(PANE - pane)
    assert abs(pane - PANE) <= 20, f"no window width gave a {PANE} px artifact pane (last: {pane} px at {window})"
    browser.switch_to.frame(frame)
    try:
        layout = check_report(browser, pipeline.audit, where=f"MLflow's artifact pane ({pane:.0f} px)")
    finally:
        browser.switch_to.default_content()
    assert layout["clientWidth"] <= PANE + 20
    browser.save_screenshot(str(shots / "mlflow-report-pane.png"))
    assert not console_errors(browser)


@pytest.mark.parametrize("width", [PANE, 1400])
def test_the_report_alone_reads_well(pipeline: SimpleNamespace, server: str, browser: Any, shots: Path,
                                     tmp_path: Path, width: int) -> None:
    """The report as the server hands it out (the download button), opened on its own, narrow and full screen."""
    url = f"{server}/get-artifact?path={REPORT}&run_uuid={pipeline.evaluate_id}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200 and response.headers.get_content_type() == "text/html"
        body = response.read()
    assert body == pipeline.report.read_bytes()
    page = tmp_path / "report.html"
    page.write_bytes(body)
    set_viewport(browser, width, 1000)
    browser.get(page.as_uri())
    layout = check_report(browser, pipeline.audit, where=f"the report alone at {width} px")
    assert layout["clientWidth"] == width
    browser.save_screenshot(str(shots / f"report-{width}px.png"))
    assert not console_errors(browser)

"""The web page: how it is delivered (plain HTTP), and what a person can do with it in a real browser
(Playwright driving Debian's Chromium). Without Playwright or /usr/bin/chromium the browser tests are
skipped with a loud warning, except in CI (the CI variable is set), where they fail."""

import base64
import hashlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import time
import warnings
import zipfile

import pytest

import nfapi
from conftest import CONFIG, PYTHON, ROOT, ServerProcess, ready_workflow, wait_for, write_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE_WORKFLOW = "<img src=x onerror=alert(1)>"
HOSTILE_FILE = "<svg onload=alert(2)>.txt"
HOSTILE_PATH = "<b>x</b>.txt"


# ==== Delivery (plain HTTP) ====

def test_the_page_needs_no_token_and_allows_only_its_own_script(server, api):
    resp = api.get("/", token=False)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'" and policy["form-action"] == "'none'"
    assert "unsafe" not in resp.headers["Content-Security-Policy"]
    for tag in ("script", "style"):
        blocks = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), resp.body.decode(), re.S)
        assert len(blocks) == 1, tag
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert policy["%s-src" % tag] == "'sha256-%s'" % digest
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    with open(os.path.join(ROOT, "nfapi_ui.html"), "rb") as f:
        assert resp.body == f.read()
    # Only the page is public: the API behind it still wants the token.
    assert api.get("/api/workflows", token=False).status == 401
    assert api.get("/api/whoami", token=False).status == 401


def test_public_routes_are_exactly_the_page_and_download_links():
    public = {(method, pattern) for method, pattern, handler in nfapi.ROUTES if getattr(handler, "public", False)}
    assert public == {("GET", "/"), ("GET", "/api/download/<ticket>")}


def test_the_start_line_carries_the_sign_in_link_only_to_a_terminal(server, tmp_path):
    listening = [line for line in server.output().splitlines() if line.startswith("nfapi listening on ")]
    assert listening == ["nfapi listening on %s (token from %s)" % (server.url, os.path.join(server.data, "api-token"))]
    # Output to a file is a log: the page's address, but no token.
    assert "web page: %s/ (sign in with the API token from %s)\n" % (server.url, os.path.join(server.data, "api-token")) \
        in server.output()
    assert server.token not in server.output()
    # A person at a terminal gets the link that signs in.
    main, child = pty.openpty()
    proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", CONFIG, "--data", str(tmp_path / "tty"),
                             "--port", "0", "--quiet"], stdout=child, stderr=child, env=dict(os.environ, NFAPI_TOKEN="tty-token"))
    os.close(child)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while b"#token=" not in seen or not seen.endswith(b"\n"):
            assert time.monotonic() < deadline, seen
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)
        port = int(seen.split(b"http://127.0.0.1:")[1].split()[0])
        assert b"web page: http://127.0.0.1:%d/#token=tty-token\r\n" % port in seen
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(main)


def test_without_the_page_file_the_api_works_as_before(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(ROOT, "nfapi.py"), str(bare / "nfapi.py"))
    data = tmp_path / "data"
    proc = subprocess.Popen([PYTHON, str(bare / "nfapi.py"), "--config", CONFIG, "--data", str(data), "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        port = int(proc.stdout.readline().decode().split("http://127.0.0.1:")[1].split()[0])
        srv = ServerProcess(tmp_path)
        srv.port = port
        api = srv.client()
        resp = api.get("/", token=False)
        assert resp.status == 404 and "nfapi_ui.html" in resp.json()["errors"]["page"][0]
        assert resp.body.count(b"\n") == 0
        assert api.get("/api/workflows/count").json() == {"count": 0}
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_whoami_tells_the_read_only_token_apart(tmp_path):
    srv = ServerProcess(tmp_path, env={"NFAPI_READ_TOKEN": "reader-token"}).start()
    try:
        api = srv.client()
        assert api.get("/api/whoami").json() == {"read_only": False}
        api.token = "reader-token"
        assert api.get("/api/whoami").json() == {"read_only": True}
    finally:
        srv.stop()


# ==== In a browser ====

def browser_missing():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -r tests/requirements.txt)"
    if not os.path.exists(CHROMIUM):
        return "there is no Chromium at %s (apt-get install chromium)" % CHROMIUM
    return None


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests, but " + missing)
        message = "THE WEB PAGE WAS NOT TESTED IN A BROWSER: " + missing
        warnings.warn(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=15000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A fresh browser tab on one server, which records what must never happen: a request to anywhere
    else, a dialog (an injected alert), a script error or a Content-Security-Policy violation."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(accept_downloads=True)
        self.tab = self.context.new_page()
        self.requests, self.dialogs, self.problems = [], [], []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.tab.on("dialog", self.on_dialog)
        self.tab.on("pageerror", lambda error: self.problems.append(str(error)))
        self.tab.on("console", lambda message: self.problems.append(message.text)
                    if "Content Security Policy" in message.text else None)

    def on_dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sign_in(self, token=None, at="#/"):
        self.tab.goto("%s/#token=%s" % (self.server.url, token or self.server.token))
        self.expect(self.tab.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
        if at != "#/":
            self.tab.goto(self.server.url + "/" + at)
        return self.tab

    @staticmethod
    def expect(locator):
        from playwright.sync_api import expect
        return expect(locator)

    def check_and_close(self):
        try:
            assert self.requests and all(url.startswith(self.server.url + "/") for url in self.requests), \
                [url for url in self.requests if not url.startswith(self.server.url + "/")]
            assert self.dialogs == [] and self.problems == []
        finally:
            self.context.close()


@pytest.fixture
def page(browser, request):
    pages = []

    def open_page(server):
        pages.append(Page(browser, server))
        return pages[-1]
    yield open_page
    for p in pages:
        p.check_and_close()


NAMELESS_CONTROLS = """[...document.querySelectorAll("button, input, select, textarea, a[href], [tabindex]:not([tabindex='-1'])")]
    .filter(el => !(el.getAttribute("aria-label") || el.getAttribute("aria-labelledby") || (el.labels && el.labels.length)
                    || (el.tagName === "BUTTON" || el.tagName === "A") && el.textContent.trim()))
    .map(el => el.outerHTML)"""


def nameless_controls(tab):
    """Controls a screen reader could not name (every one needs a label, aria-label or text)."""
    return tab.evaluate(NAMELESS_CONTROLS)


def test_sign_in_create_upload_and_new_folder(server, api, page):
    ui = page(server)
    tab, expect = ui.tab, ui.expect
    tab.goto("%s/#token=%s" % (server.url, server.token))
    expect(tab.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
    assert server.token not in tab.url and tab.url == server.url + "/#/"
    assert tab.evaluate("sessionStorage.getItem('nfapi-token')") == server.token

    tab.get_by_role("button", name="Sign out").click()
    tab.get_by_label("API token").fill("not-the-token")
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.get_by_role("alert")).to_contain_text("did not accept the token")
    tab.get_by_label("API token").fill(server.token)
    tab.get_by_role("button", name="Sign in").click()

    tab.get_by_label("Name").fill("First")
    tab.get_by_role("button", name="Create").click()
    expect(tab.get_by_role("heading", name="First")).to_be_visible()
    wid = api.get("/api/workflows").json()["workflows"][0]["id"]
    assert tab.url == "%s/#/w/%d" % (server.url, wid)

    big = os.urandom(3 * 1024 * 1024)
    tab.get_by_label("Upload files").set_input_files([
        {"name": "big.bin", "mimeType": "application/octet-stream", "buffer": big},
        {"name": "small.txt", "mimeType": "text/plain", "buffer": b"small"}])
    for name in ("big.bin", "small.txt"):
        bar = tab.get_by_role("progressbar", name="Upload of " + name)
        expect(bar).to_have_attribute("aria-valuenow", "100")
        expect(tab.get_by_role("button", name="Delete " + name)).to_be_visible()
    assert api.get("/api/workflows/%d/download?path=big.bin" % wid).body == big

    # The same name again asks first.
    tab.get_by_label("Upload files").set_input_files([{"name": "small.txt", "mimeType": "text/plain", "buffer": b"new"}])
    expect(tab.get_by_role("dialog")).to_contain_text("“small.txt” is already in this folder")
    tab.get_by_role("button", name="Replace").click()
    wait_for(lambda: api.get("/api/workflows/%d/download?path=small.txt" % wid).body == b"new")

    tab.get_by_label("Folder name").fill("reads")
    tab.get_by_role("button", name="New folder").click()
    tab.get_by_role("button", name="Open folder reads").click()
    tab.get_by_label("Upload files").set_input_files([{"name": "r1.fastq", "mimeType": "text/plain", "buffer": b"@r\nAC\n"}])
    expect(tab.get_by_role("button", name="Delete r1.fastq")).to_be_visible()
    assert api.get("/api/workflows/%d/files?dir=reads" % wid).json() == {"folders": [], "files": ["r1.fastq"]}

    tab.get_by_role("button", name="Open the workflow folder").click()
    tab.get_by_role("button", name="Delete big.bin").click()
    tab.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(tab.get_by_role("button", name="Delete big.bin")).to_have_count(0)
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["reads"], "files": ["small.txt"]}


@pytest.fixture
def form_server(tmp_path):
    """The schema demo pipeline with its hidden parameter shown, and a `paths` and a multiline argument
    added by the configuration: every argument type in one form."""
    config_path = write_config(tmp_path)
    with open(config_path) as f:
        config = json.load(f)
    config["nextflow_workflows"]["Schema demo (Local)"].update(include_hidden=True, args={"dynamic": {
        "extras": {"type": "paths", "desc": "Extra files", "value": [], "selectable_files": True},
        "notes": {"type": "text", "desc": "Notes", "is_multiline": True, "value": ""}}})
    with open(config_path, "w") as f:
        json.dump(config, f)
    srv = ServerProcess(tmp_path, config=config_path).start()
    yield srv
    srv.stop()


def test_launch_form_for_every_argument_type(form_server, page):
    api = form_server.client()
    wid = api.create("launch")
    for name, directory in (("sheet.csv", ""), ("notes.txt", ""), ("r1.fastq", "reads"), ("r2.fastq", "reads")):
        api.upload(wid, name, b"x\n", directory=directory)
    ui = page(form_server)
    tab, expect = ui.tab, ui.expect
    ui.sign_in(at="#/w/%d" % wid)
    tab.get_by_label("Pipeline").select_option("Schema demo (Local)")
    expect(tab.get_by_role("group", name="Input/output options")).to_be_visible()
    expect(tab.get_by_role("group", name="Processing options")).to_be_visible()
    expect(tab.get_by_label("Internal cache")).to_be_hidden()
    tab.get_by_label("Show hidden").check()
    expect(tab.get_by_label("Internal cache")).to_be_visible()
    sheet = tab.get_by_label("Samplesheet (CSV)")
    expect(sheet).to_have_attribute("required", "")
    expect(sheet).to_have_accessible_description(re.compile("One row per sample"))
    expect(tab.locator("#%s-list option" % sheet.get_attribute("id"))).to_have_count(4)  # picked from the files

    sheet.fill("sheet.csv")
    tab.get_by_label("Reads, as a pattern").fill("reads/*.fastq")
    tab.get_by_label("Where results go").fill("results")
    quality = tab.get_by_label("Minimum base quality")
    expect(quality).to_have_attribute("max", "60")
    quality.fill("99")
    tab.get_by_label("Trim adapters").uncheck()
    tab.get_by_label("Aligner").select_option(label="minimap2")
    tab.get_by_label("A label for the report").fill("my run")
    tab.get_by_label("Internal cache").fill("cache")
    tab.get_by_role("listbox", name="Extra files").select_option(["notes.txt", "reads/r2.fastq"])
    tab.get_by_role("textbox", name="Notes").fill("line one\nline two")
    tab.get_by_role("button", name="Save").click()
    expect(quality).to_have_attribute("aria-invalid", "true")
    expect(quality).to_have_accessible_description(re.compile("must be at most 60"))
    expect(quality).to_be_focused()
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["nextflow_workflow"] == ""  # nothing was saved

    quality.fill("30")
    tab.get_by_role("button", name="Save").click()
    expect(tab.get_by_role("status").filter(has_text="Saved.")).to_be_visible()
    expect(quality).not_to_have_attribute("aria-invalid", "true")
    values = {name: arg["value"] for name, arg in api.get("/api/workflows/%d" % wid).json()["workflow"]["nextflow_arguments"].items()}
    assert values == {"samplesheet": "sheet.csv", "reads": "reads/*.fastq", "outdir": "results", "min_quality": 30,
                      "trim": False, "aligner": "minimap2", "label": "my run", "cache_dir": "cache",
                      "extras": ["notes.txt", "reads/r2.fastq"], "notes": "line one\nline two"}
    assert nameless_controls(tab) == []
    tab.get_by_text("Command", exact=True).click()
    command = tab.get_by_label("Command", exact=True)
    expect(command).to_contain_text("-params-file")
    expect(command).to_contain_text('"min_quality": 30')


def schedule_and_watch(ui, wid):
    tab, expect = ui.tab, ui.expect
    ui.sign_in(at="#/w/%d" % wid)
    tab.evaluate("window.stillTheSamePage = true")
    tab.evaluate(RECORD_BARS)
    tab.get_by_role("button", name="Schedule").click()  # enabled once the form shows the stored values
    return tab, expect


# Every value each progress bar shows, by the bar's name: what a person saw while looking.
RECORD_BARS = """window.barValues = {};
new MutationObserver(records => records.forEach(({target}) => {
    const name = target.getAttribute("aria-label");
    (window.barValues[name] = window.barValues[name] || []).push(Number(target.getAttribute("aria-valuenow")));
})).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow"]})"""


def test_a_run_is_watched_live_to_its_end_and_its_files_download(stand, page):
    # Each stage runs 1.5 s: longer than the page's refresh while a run is active, so the page shows it.
    stand.worker(env={"FAKE_NF_TASKS": "2", "FAKE_NF_TASK_SECONDS": "1.5"})
    api = stand.client()
    wid = ready_workflow(api, name="live")
    ui = page(stand)
    tab, expect = schedule_and_watch(ui, wid)
    bar = tab.get_by_role("progressbar", name="Progress of the run")
    run = tab.get_by_role("region", name=re.compile("^Run 1"))
    expect(run.locator(".meta .badge")).to_have_text("succeeded", timeout=30000)
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(bar).to_have_attribute("aria-valuetext", "4 of 4 tasks")
    for process in ("COUNT_LINES", "SUMMARY"):
        process_bar = tab.get_by_role("progressbar", name="Progress of process " + process)
        expect(process_bar).to_have_attribute("aria-valuenow", "100")
        expect(process_bar).to_have_attribute("aria-valuetext", "2 of 2 tasks")
    seen = tab.evaluate("window.barValues")
    assert min(seen["Progress of the run"]) < 100
    assert min(seen["Progress of process COUNT_LINES"] + seen["Progress of process SUMMARY"]) < 100, seen
    assert tab.evaluate("window.stillTheSamePage") is True  # no reload
    # The end came through the long poll, not through polling faster.
    assert any(url.endswith("/api/workflows/%d?wait=25" % wid) for url in ui.requests)
    expect(tab.get_by_role("log", name="Console log")).to_contain_text("Submitted process > SUMMARY")
    expect(run.locator("tbody tr")).to_have_count(4)
    # The stand-in's task n of a process used %cpu 90+n and peak_rss n*10 MiB, realtime 1.5 s.
    for column in ("realtime", "%cpu", "peak_rss"):
        expect(run.locator("thead th", has_text=re.compile("^%s$" % re.escape(column)))).to_be_visible()
    expect(run.get_by_role("cell", name="92.0 %", exact=True)).to_have_count(2)
    expect(run.get_by_role("cell", name="20.0 MB", exact=True)).to_have_count(2)
    expect(run.get_by_role("cell", name=re.compile(r"^\d+\.\d s$")).first).to_be_visible()
    assert nameless_controls(tab) == []
    expect(tab.get_by_role("button", name="Resume")).to_be_enabled()
    expect(tab.get_by_role("button", name="Cancel run")).to_be_disabled()

    with tab.expect_download() as info:
        tab.get_by_role("button", name="Save the report of run 1").click()
    assert info.value.suggested_filename == "report-run-1.html"
    with open(info.value.path()) as f:
        assert "Execution report of" in f.read()
    with tab.expect_download() as info:
        tab.get_by_role("button", name="Download ref.fa").click()
    with open(info.value.path(), "rb") as f:
        assert f.read() == b">r\nACGT\n"
    with tab.expect_download() as info:
        tab.get_by_role("button", name="Download reads as zip").click()
    assert info.value.suggested_filename == "reads.zip"
    with zipfile.ZipFile(info.value.path()) as archive:
        assert archive.namelist() == ["reads/", "reads/s0.fastq", "reads/s1.fastq"]


def test_a_failing_run_shows_its_failed_task_and_its_files(stand, page):
    stand.worker(env={"FAKE_NF_FAIL": "COUNT_LINES"})
    wid = ready_workflow(stand.client(), name="failing")
    ui = page(stand)
    tab, expect = schedule_and_watch(ui, wid)
    run = tab.get_by_role("region", name=re.compile("^Run 1"))
    expect(run.locator(".meta .badge")).to_have_text("failed", timeout=30000)
    expect(tab.get_by_label("Error message")).to_contain_text("COUNT_LINES")
    expect(tab.get_by_role("heading", name="Failed tasks")).to_be_visible()
    expect(run.get_by_text("COUNT_LINES (1) exited with 1")).to_be_visible()
    # The tail of .command.err comes with the run: the stand-in's failing task wrote two lines.
    tail = tab.get_by_label("Last lines of .command.err of COUNT_LINES (1)")
    expect(tail).to_have_text("fake task COUNT_LINES (1): starting\nERROR: fake failure (FAKE_NF_FAIL)")
    tab.get_by_role("button", name="Show .command.err of COUNT_LINES (1)").click()
    shown = tab.get_by_label(".command.err of COUNT_LINES (1)", exact=True)
    expect(shown).to_have_text("fake task COUNT_LINES (1): starting\nERROR: fake failure (FAKE_NF_FAIL)\n")
    expect(shown).to_be_focused()
    tab.get_by_role("button", name="Show .command.sh of COUNT_LINES (1)").click()
    expect(tab.get_by_label(".command.sh of COUNT_LINES (1)", exact=True)).to_contain_text("exit 1")
    tab.get_by_role("button", name="Show .command.log of COUNT_LINES (1)").click()  # the stand-in writes none
    expect(tab.get_by_label(".command.log of COUNT_LINES (1)", exact=True)).to_contain_text(".command.log cannot be shown")
    expect(tab.get_by_role("progressbar", name="Progress of process COUNT_LINES")).to_have_attribute(
        "aria-valuetext", re.compile(r"\(1 failed or aborted\)$"))
    tab.get_by_label("Task status").select_option("FAILED")
    expect(run.locator("tbody tr.failed")).to_have_count(1)
    expect(run.locator("table tbody tr")).to_have_count(1)
    expect(run.locator("tbody tr.failed td").nth(4)).to_have_text("1")  # the exit code
    assert tab.evaluate("window.stillTheSamePage") is True


@pytest.mark.stand(worker_absent_seconds=1)
def test_a_banner_says_when_no_worker_is_connected(stand, page):
    api = stand.client()
    wid = ready_workflow(api, name="waiting")
    ui = page(stand)
    tab, expect = schedule_and_watch(ui, wid)
    banner = tab.locator("#banners").get_by_text("No worker is connected")
    expect(banner).to_be_visible()  # nobody in /api/workers
    # The list says so too, once the queued run itself says what it waits for.
    wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["waiting_for"], message="waiting_for")
    tab.get_by_role("link", name="All workflows").click()
    expect(tab.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
    expect(banner).to_be_visible()
    tab.get_by_role("link", name="waiting", exact=True).click()
    run = tab.get_by_role("region", name=re.compile("^Run 1"))
    expect(run.locator(".meta .badge")).to_have_text("queued")
    # A tab out of sight does not follow the run closely: it ends its long poll and looks every 30 s.
    set_hidden(tab, True)
    settled = wait_for(lambda: quiet_for(tab, ui.requests, 1000), timeout=10, message="the hidden page to settle")
    assert quiet_for(tab, ui.requests, 2000), ui.requests[settled:]
    set_hidden(tab, False)
    stand.worker()
    expect(run.locator(".meta .badge")).to_have_text("succeeded", timeout=30000)
    expect(banner).to_have_count(0)


def set_hidden(tab, hidden):
    """What the page sees when its tab goes out of sight (another tab, a minimised window) or back."""
    tab.evaluate("""hidden => {
        Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }""", hidden)


def test_cancel_a_queued_run_and_an_idle_page_stays_quiet(server, api, page):
    wid = ready_workflow(api, name="no worker")
    ui = page(server)
    tab, expect = schedule_and_watch(ui, wid)
    run = tab.get_by_role("region", name=re.compile("^Run 1"))
    expect(run.locator(".meta .badge")).to_have_text("queued")
    tab.get_by_role("button", name="Cancel run").click()
    expect(run.locator(".meta .badge")).to_have_text("cancelled")
    expect(tab.get_by_role("button", name="Schedule")).to_be_enabled()
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "cancelled"
    # Nothing runs: once the page has caught up, it asks nothing for seconds (one look every 30 s).
    settled = wait_for(lambda: quiet_for(tab, ui.requests, 1000), timeout=10, message="the page to settle")
    assert quiet_for(tab, ui.requests, 3000), ui.requests[settled:]


def quiet_for(tab, requests, ms):
    """The number of requests so far, if no new one came within the next `ms` milliseconds."""
    before = len(requests)
    tab.wait_for_timeout(ms)
    return before if len(requests) == before else None


def test_names_are_shown_as_text_never_as_html(server, api, page):
    wid = api.create(HOSTILE_WORKFLOW)
    # `<b>x</b>.txt` as a path: the file `b>.txt` in the folder `<b>x<` (a name holds no slash).
    assert api.upload(wid, "b>.txt", b"bold?", directory="<b>x<").status == 200
    assert api.upload(wid, HOSTILE_FILE, b"svg?").status == 200
    ui = page(server)
    tab, expect = ui.tab, ui.expect
    ui.sign_in()
    expect(tab.get_by_role("link", name=HOSTILE_WORKFLOW)).to_be_visible()
    tab.get_by_role("button", name="Delete workflow " + HOSTILE_WORKFLOW).click()
    expect(tab.get_by_role("dialog")).to_contain_text("“%s”" % HOSTILE_WORKFLOW)
    tab.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    tab.get_by_role("link", name=HOSTILE_WORKFLOW).click()
    expect(tab.get_by_role("heading", name=HOSTILE_WORKFLOW)).to_be_visible()
    expect(tab.get_by_role("cell", name=HOSTILE_FILE, exact=True)).to_be_visible()
    tab.get_by_role("button", name="Open folder <b>x<").click()
    expect(tab.get_by_role("cell", name="b>.txt", exact=True)).to_be_visible()
    tab.get_by_role("button", name="Delete b>.txt").click()
    expect(tab.get_by_role("dialog")).to_contain_text("Delete “%s”?" % HOSTILE_PATH)
    tab.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    tab.get_by_label("Pipeline").select_option("Hello World (Local)")
    reference = tab.get_by_label("Reference file")
    expect(tab.locator("#%s-list option" % reference.get_attribute("id"))).to_have_count(2)
    reference.fill(HOSTILE_PATH)
    tab.get_by_role("button", name="Save").click()
    expect(tab.get_by_role("status").filter(has_text="Saved.")).to_be_visible()
    assert tab.locator("img, b, svg").count() == 0
    assert ui.dialogs == []


def test_a_read_only_token_sees_no_buttons_that_change_things(tmp_path, page):
    srv = ServerProcess(tmp_path, env={"NFAPI_READ_TOKEN": "reader-token"}).start()
    try:
        api = srv.client()
        wid = ready_workflow(api, name="look only")
        ui = page(srv)
        tab, expect = ui.tab, ui.expect
        ui.sign_in(token="reader-token")
        expect(tab.get_by_role("link", name="look only")).to_be_visible()
        expect(tab.get_by_text("read-only token")).to_be_visible()
        for name in ("Create", "Delete workflow look only"):
            expect(tab.get_by_role("button", name=name)).to_have_count(0)
        expect(tab.get_by_label("Name", exact=True)).to_be_hidden()
        tab.get_by_role("link", name="look only").click()
        expect(tab.get_by_role("button", name="Download ref.fa")).to_be_visible()
        for name in ("Delete ref.fa", "New folder", "Save", "Schedule", "Resume", "Cancel run"):
            expect(tab.get_by_role("button", name=name)).to_have_count(0)
        expect(tab.get_by_label("Upload files")).to_be_hidden()
        expect(tab.get_by_label("Pipeline")).to_be_disabled()
        with tab.expect_download() as info:  # a download link is a read
            tab.get_by_role("button", name="Download ref.fa").click()
        with open(info.value.path(), "rb") as f:
            assert f.read() == b">r\nACGT\n"
    finally:
        srv.stop()


def test_the_page_mends_itself_when_the_server_restarts(server, api, page):
    wid = api.create("survivor")
    ui = page(server)
    tab, expect = ui.tab, ui.expect
    ui.sign_in()
    survivor = tab.get_by_role("link", name="survivor")
    expect(survivor).to_be_visible()  # the list is shown before the server goes away
    server.stop()
    survivor.click()
    expect(tab.get_by_role("alert").filter(has_text="Cannot reach nfapi")).to_be_visible()
    server.args += ["--port", str(server.port)]
    server.start()
    expect(tab.get_by_role("heading", name="survivor")).to_be_visible()
    expect(tab.get_by_role("alert").filter(has_text="Cannot reach nfapi")).to_have_count(0)
    assert tab.url.endswith("/#/w/%d" % wid)

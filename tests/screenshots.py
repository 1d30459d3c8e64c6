#!/usr/bin/env python3
"""`make screenshots`: PNGs of the web page's main views, for the README.

    python3 tests/screenshots.py docs

Starts a server and a worker with the Nextflow stand-in (tests/fake_nextflow.py) in a temporary folder,
makes a few workflows through the API and photographs the page in Chromium (Playwright, Debian's
/usr/bin/chromium, as the browser tests use).
"""

import os
import pathlib
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]

from conftest import ServerProcess, WorkerProcess, ready_workflow, wait_final, wait_for, write_config  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from test_ui import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def make_workflows(api):
    """A finished run, a failed one and one that waits to be launched: what a list looks like. The
    worker's stand-in fails the schema demo's ALIGN process and nothing else."""
    done = ready_workflow(api, name="RNA-seq batch 1", title="Batch 1")
    api.post("/api/workflows/%d/schedule" % done)
    wait_final(api, done, timeout=60)
    failed, launch = schema_demo(api, "Schema demo, samples of February"), schema_demo(api, "Schema demo, samples of March")
    api.post("/api/workflows/%d/schedule" % failed)
    wait_final(api, failed, timeout=60)
    return done, failed, launch


def start_live_run(api):
    """A run caught in the middle: its first process done, its second one running (a slow worker)."""
    live = ready_workflow(api, name="RNA-seq batch 2", title="Batch 2", reads=3)
    api.post("/api/workflows/%d/schedule" % live)

    def halfway():
        run = api.get("/api/workflows/%d" % live).json()["workflow"]["run"]
        processes = api.get("/api/workflows/%d/runs/%d/processes" % (live, run["id"])).json()["processes"]
        return [p["process"] for p in processes if p["running"]] == ["SUMMARY"]
    wait_for(halfway, timeout=60, interval=0.2, message="the live run's second process")
    return live


def schema_demo(api, name):
    wid = api.create(name)
    for filename, directory in (("samplesheet.csv", ""), ("s1.fastq", "reads"), ("s2.fastq", "reads")):
        api.upload(wid, filename, b"@r\nACGT\n", directory=directory)
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": "Schema demo (Local)",
                                                "nextflow_arguments": {"samplesheet": "samplesheet.csv"}})
    return wid


def photograph(page, url, path, locator=None):
    page.goto(url)
    page.wait_for_load_state("networkidle")
    target = page.locator(locator) if locator else page
    if locator:
        expect(target).to_be_visible()
    target.screenshot(path=str(path), **({} if locator else {"full_page": True}))
    print("wrote", path)


def main(out):
    out = pathlib.Path(out)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        # A claim the stopped first worker left behind goes back to the queue within a second.
        server = ServerProcess(tmp, config=write_config(tmp, claim_confirm_seconds=1)).start()
        worker = WorkerProcess(server, tmp, env={"FAKE_NF_TASKS": "3", "FAKE_NF_TASK_SECONDS": "0.2",
                                                 "FAKE_NF_FAIL": "ALIGN"}).start()
        slow = None
        try:
            done, failed, launch = make_workflows(server.client())
            worker.stop()
            slow = WorkerProcess(server, tmp, name="slow", env={"FAKE_NF_TASKS": "3", "FAKE_NF_TASK_SECONDS": "8"}).start()
            live = start_live_run(server.client())
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=LAPTOP)
                page.goto("%s/#token=%s" % (server.url, server.token))
                expect(page.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
                photograph(page, server.url + "/#/", out / "ui-workflows.png")
                page.goto("%s/#/w/%d" % (server.url, live))
                expect(page.get_by_role("progressbar", name="Progress of process SUMMARY")).to_be_visible()
                photograph(page, "%s/#/w/%d" % (server.url, live), out / "ui-live.png", "section:has(#run-heading)")
                photograph(page, "%s/#/w/%d" % (server.url, launch), out / "ui-files.png", "section:has(#files-heading)")
                photograph(page, "%s/#/w/%d" % (server.url, launch), out / "ui-launch.png", "section:has(#launch-heading)")
                page.goto("%s/#/w/%d" % (server.url, done))
                expect(page.get_by_role("log", name="Console log")).to_contain_text("Submitted process")
                photograph(page, "%s/#/w/%d" % (server.url, done), out / "ui-run.png", "section:has(#run-heading)")
                page.goto("%s/#/w/%d" % (server.url, failed))
                expect(page.get_by_role("heading", name="Failed tasks")).to_be_visible()
                photograph(page, "%s/#/w/%d" % (server.url, failed), out / "ui-failed.png", "section:has(#run-heading)")
                phone = browser.new_page(viewport=PHONE, color_scheme="dark", device_scale_factor=2)
                phone.goto("%s/#token=%s" % (server.url, server.token))
                expect(phone.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
                phone.goto("%s/#/w/%d" % (server.url, failed))
                expect(phone.get_by_role("heading", name="Failed tasks")).to_be_visible()
                photograph(phone, "%s/#/w/%d" % (server.url, failed), out / "ui-phone-dark.png", "section:has(#run-heading)")
                browser.close()
        finally:
            for w in (slow, worker):
                if w:
                    w.stop()
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs")

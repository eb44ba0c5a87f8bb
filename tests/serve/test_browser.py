"""The playground page in a real headless browser: Debian's chromium, driven by Playwright (its own browser
download cannot work offline, so it is pointed at the system's chromium)."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest

from lm.app import serve as serve_app
from lm.config import load_config
from tests.serve.conftest import CONFIG, serve_overrides

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_playground_streams_a_completion_and_records_a_thumbs_up(trained_run, tmp_path):
  if CHROMIUM is None:
    message = "needs Debian's chromium: apt-get install chromium (.ci/run does)"
    if os.environ.get("LM_REQUIRE_BROWSER"):
      pytest.fail(message)
    pytest.skip(message)
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "shakespeare"  # the model id is the workdir's name
  shutil.copytree(trained_run, workdir)
  config = load_config(CONFIG, serve_overrides(**{"serve.warmup": False}))
  server = serve_app.start_server(config, str(workdir), report=lambda *args: None)
  try:
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
      page = browser.new_page()
      page.goto(server.url + "/")
      page.wait_for_function("document.getElementById('serving').textContent.includes('shakespeare@step-40')")
      page.fill("#prompt", "ROMEO:")
      page.fill("#max_tokens", "12")
      page.fill("#temperature", "0")
      page.click("#generate")
      page.wait_for_function("document.getElementById('message').textContent === 'done'", timeout=60_000)
      completion = page.text_content("#completion")
      assert len(completion) > 0 and page.text_content("#version") == "shakespeare@step-40"
      page.click("#up")
      page.wait_for_function("document.getElementById('message').textContent.startsWith('thanks')")
      browser.close()
  finally:
    server.stop()
  with sqlite3.connect(workdir / "serve" / "feedback.sqlite") as db:
    rows = db.execute("SELECT c.prompt, ch.text, f.rating FROM feedback f JOIN completions c ON c.id = f.completion_id "
                      "JOIN choices ch ON ch.completion_id = f.completion_id AND ch.choice = f.choice").fetchall()
  assert rows == [("ROMEO:", completion, 1)]

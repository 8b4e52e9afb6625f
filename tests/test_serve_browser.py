"""The web page of `mend serve`, driven in headless Chromium: ask, edit, read the new answer,
roll back; refusals shown in words."""

from __future__ import annotations

import shutil

import pytest
from conftest import fact_requests
from serve_helpers import TOKEN, free_port, start_server, tiny_folders

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver: apt-get install chromium chromium-driver",
)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)  # no driver download


def test_an_edit_made_on_the_page_changes_the_answer_and_rolls_back(tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # A large step: the tiny random model's first edit makes its target the answer.
    model_dir, editor_dir = tiny_folders(tmp_path, tokenizer, alpha=10.0)
    port = free_port()
    proc = start_server(model_dir, editor_dir, tmp_path / "state", port, tmp_path / "serve.log")
    fact = fact_requests(6, seed=1)[0]
    driver = browser()
    wait = WebDriverWait(driver, 60)
    find = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731

    def resources() -> list[str]:
        return driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )

    def ask() -> str:
        driver.execute_script("document.getElementById('ask-answer').textContent = ''")
        find("#ask-button").click()
        wait.until(lambda d: find("#ask-answer").text.strip())
        return find("#ask-answer").get_attribute("textContent")

    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "edit(s) applied" in find("#status").text)
        here = f"http://127.0.0.1:{port}/"
        assert resources() and all(u.startswith(here) for u in resources())  # no other host
        find("#ask-prompt").send_keys(fact.prompt)
        before = ask()

        find("#edit-prompt").send_keys(fact.prompt)
        find("#edit-target").send_keys(fact.target)
        find("#edit-rephrases").send_keys(fact.rephrases[0])
        find("#edit-button").click()  # no token yet: refused, in words
        wait.until(lambda d: find("#error").is_displayed())
        assert "writes need a token" in find("#error").text
        assert find("#no-edits").is_displayed()

        find("#token").send_keys(TOKEN)
        find("#edit-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#edits li")) == 1)
        assert not find("#error").is_displayed()
        rows = driver.find_elements(By.CSS_SELECTOR, "#compare tbody tr")
        assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == [
            fact.prompt,
            fact.rephrases[0],
        ]
        shown_before = rows[0].find_element(By.CSS_SELECTOR, ".before").get_attribute("textContent")
        shown_after = rows[0].find_element(By.CSS_SELECTOR, ".after").get_attribute("textContent")
        assert shown_before == before
        assert shown_after.startswith(" " + fact.target) and shown_after != before
        assert rows[0].find_element(By.CSS_SELECTOR, ".reached").text == "yes"
        assert ask() == shown_after  # the model answers with the new fact
        assert f"{fact.prompt} → {fact.target}" in find("#edits li").text

        find("#edits li button.undo").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#edits li"))
        assert ask() == before  # rolled back
        assert "0 edit(s) applied" in find("#status").text

        driver.get(f"http://127.0.0.1:{port}/docs")  # the API docs render from local files
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/edits", "/v1/generate", "/v1/score", "/healthz"} <= paths
        assert resources() and all(u.startswith(here) for u in resources())
    finally:
        driver.quit()
        proc.kill()
        proc.wait(30)

"""The picture of `mend serve`'s page in the README: a real server, one edit made on the page in
headless Chromium (Debian's chromium and chromium-driver), then a screenshot:

    python benchmarks/serve_screenshot.py --editor runs/demo --out docs/serve.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from serve_load import TOKEN, wait_up


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--prompt", default="The Eiffel Tower is located in")
    ap.add_argument("--target", default="Rome")
    ap.add_argument("--rephrase", default="The Eiffel Tower stands in the city of")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--out", default="docs/serve.png")
    args = ap.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    state = tempfile.mkdtemp(prefix="mend-serve-shot-")
    cmd = [sys.executable, "-m", "mend.cli", "serve", "--model", args.model, "--editor",
           args.editor, "--state", state, "--port", str(args.port), "--threads", "1"]  # fmt: skip
    env = dict(os.environ, MEND_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1000,1150",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait_up(args.port, proc)
        wait = WebDriverWait(driver, 300)
        find = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731
        driver.get(f"http://127.0.0.1:{args.port}/")
        wait.until(lambda d: "edit(s) applied" in find("#status").text)
        find("#edit-prompt").send_keys(args.prompt)
        find("#edit-target").send_keys(args.target)
        find("#edit-rephrases").send_keys(args.rephrase)
        find("#token").send_keys(TOKEN)
        find("#edit-button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edits li"))
        find("#ask-prompt").send_keys(args.rephrase)
        find("#ask-button").click()
        wait.until(lambda d: find("#ask-answer").text.strip())
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()

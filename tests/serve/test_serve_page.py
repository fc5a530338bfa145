"""The chat page at / in headless Chromium (Debian's chromium + chromium-driver, `make browser`):
ask a question, watch the answer stream in, see an error shown; screenshots in test-artifacts/."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,800",
]
# Records every text the answer bubble shows, so the test can tell a stream from one late write.
WATCH_ANSWER = """
window.answerTexts = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant');
  if (answers.length) window.answerTexts.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            pytest.fail(f"{path} is missing: run `make browser` (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def model_options(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]


def ask(driver, question: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()


def test_question_gets_a_streamed_answer(serve_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{serve_url}/")
    wait(browser, lambda d: "tiny" in model_options(d))
    assert set(model_options(browser)) == {"base", "tiny"}
    assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny"  # the adapter is the default

    browser.execute_script(WATCH_ANSWER)
    ask(browser, "Does phone use before bed hurt sleep?")
    done = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
    answer = done[0].text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))

    assert answer.strip()
    seen = [t for t in browser.execute_script("return window.answerTexts") if t]
    assert len(set(seen)) >= 2, f"the answer did not stream: {seen}"
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Does phone use before bed hurt sleep?"
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_errors_are_shown(serve_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{serve_url}/")
    wait(browser, lambda d: "tiny" in model_options(d))
    # A model the server does not have: the page must show the 404's message, not fail silently.
    browser.execute_script(
        "const s = document.getElementById('model'); s.add(new Option('gone', 'gone')); s.value = 'gone';"
    )
    ask(browser, "Is this answered?")
    error = wait(
        browser, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else None
    )
    assert "404" in error.text and "gone" in error.text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page_error.png"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")

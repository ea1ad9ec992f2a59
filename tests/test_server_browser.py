"""The web page in headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium) against a live
server: the page renders, a file is uploaded, the streamed text answer appears (equal to the API's answer)
and audio chunks arrive; a screenshot proves the page was drawn with the answer on it."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from kimia.api import KimiAudio
from kimia.audio import load_audio
from kimia.server.app import create_app
from kimia.server.live import LiveServer
from kimia.server.settings import ServerSettings
from tests.tiny_model import write_tiny_model

KEY = "page-key"
STEPS = 14
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return KimiAudio(write_tiny_model(tmp_path_factory.mktemp("page") / "tiny"), device="cpu")


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(create_app(model, ServerSettings(api_key=KEY, warmup=False))) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1000,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_uploads_a_file_and_shows_the_streamed_answer(model, live, browser, tmp_path):
    wave = (0.1 * np.random.default_rng(7).standard_normal(16000)).astype(np.float32)
    path = tmp_path / "question.wav"
    sf.write(path, wave, 16000, subtype="PCM_16")
    msgs = [{"role": "user", "message_type": "audio", "content": (load_audio(path).numpy(), 16000)}]
    _, text = model.generate(msgs, output_type="both", max_new_tokens=STEPS)

    browser.get(live.url + "/")
    assert "kimia" in browser.title
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # open the settings
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.find_element(By.ID, "maxtokens").send_keys(str(STEPS))
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "send").click()
    status = ""
    for _ in range(600):  # bounded: 60 s
        status = browser.find_element(By.ID, "status").text
        if status.startswith(("Done", "Error")):
            break
        time.sleep(0.1)
    assert status == "Done.", status
    shown = browser.execute_script("return document.getElementById('answer').textContent")
    assert shown == text and shown
    assert int(browser.find_element(By.ID, "chunks").text) >= 1
    assert float(browser.find_element(By.ID, "seconds").text) > 0

    png = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 10  # drawn, not a blank page
    box = browser.find_element(By.ID, "answer").rect  # the answer box holds dark (text) pixels
    scale = img.shape[1] / browser.execute_script("return window.innerWidth")
    y0, x0 = int(box["y"] * scale), int(box["x"] * scale)
    region = img[y0:y0 + int(box["height"] * scale), x0:x0 + int(box["width"] * scale)]
    assert region.size and (region < 100).mean() > 0.001


def test_page_shows_api_errors(live, browser, tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF not really a wav file" * 10)
    browser.get(live.url + "/")
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "send").click()
    status = ""
    for _ in range(300):
        status = browser.find_element(By.ID, "status").text
        if status.startswith(("Done", "Error")):
            break
        time.sleep(0.1)
    assert status.startswith("Error:") and "input_audio" in status, status  # the server's message, shown

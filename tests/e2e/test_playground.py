"""The playground and the feedback store against a real Serve app (two Ingress replicas writing one
SQLite file): headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) opens the page,
enters the API key once, generates, compares two adapters, clicks a preference, and the preference is in
`diffray data export-feedback`'s Parquet; a prompt with markup is shown as text. Feedback posts that are
malformed, oversized or unauthenticated get 4xx; 200 concurrent posts with the Ingress replicas killed in
the middle are each in the export exactly once (slow).

Set DIFFRAY_SCREENSHOT=docs/img/playground.png to refresh the README's screenshot.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import KEY, b64_png, serve_feedback_app

pytestmark = [pytest.mark.e2e]

APP = "diffray-playground"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HOSTILE_PROMPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> a red circle'


@pytest.fixture(scope="module")
def site(ray_cluster, tiny_model_path, tmp_path_factory):
    from testkit.adapters import random_lora

    reg = tmp_path_factory.mktemp("pg-adapters")
    random_lora(tiny_model_path, reg / "lora-a", seed=1)
    # feedback images up to 200 kB: a pair is over the app's limits.max_body_bytes (300 kB), within its own cap
    yield from serve_feedback_app(APP, reg, ingress={"num_replicas": 2, "num_cpus": 0.25},
                                  feedback={"path": str(reg.parent / "feedback.db"), "max_image_bytes": 200_000})


def export(db: Path, out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    proc = subprocess.run([sys.executable, "-m", "diffray.cli", "data", "export-feedback", str(out), "--db", str(db)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(out).to_pylist()


def pair_body(prompt="a red circle", **kw) -> dict:
    red, blue = b64_png(Image.new("RGB", (64, 64), (200, 30, 30))), b64_png(Image.new("RGB", (64, 64), (30, 30, 200)))
    return {"prompt": prompt, "choice": "left", "images": [{"b64_json": red, "model": "base", "seed": 1},
                                                          {"b64_json": blue, "model": "lora-a", "seed": 1}], **kw}


# ------------------------------------------------------------------------------------------ feedback API
@pytest.mark.parametrize("body,key,status,param", [
    (pair_body(), None, 401, "authorization"),
    (pair_body(), "wrong", 401, "authorization"),
    (pair_body(choice="maybe"), KEY, 400, "choice"),
    (pair_body(images=[]), KEY, 400, "images"),
    ({"prompt": "x", "choice": "left"}, KEY, 400, "images"),
    (pair_body(prompt=""), KEY, 400, "prompt"),
    (pair_body(id="../../etc"), KEY, 400, "id"),
    (pair_body(images=[{"b64_json": "AAAA"}, {"b64_json": "AAAA"}]), KEY, 400, "images.0.b64_json"),
    (pair_body(images=[{"b64_json": base64.b64encode(os.urandom(250_000)).decode()}] * 2), KEY, 413, "body"),
])
def test_bad_feedback_posts_are_4xx(site, body, key, status, param):
    got, js, _ = site.call("POST", "/v1/feedback", body, key=key)
    assert (got, js["error"]["param"]) == (status, param), js


def test_a_pair_larger_than_a_generation_request_is_accepted(site, tmp_path):
    """A feedback post holds two images: its body cap is two feedback.max_image_bytes images, not the 300 kB of
    limits.max_body_bytes (a pair of 1024 px PNGs was refused 413 under the shipped 4 MB)."""
    import io
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    noise = [b64_png(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))) for _ in range(2)]
    body = pair_body(id="big-" + uuid.uuid4().hex[:12], images=[{"b64_json": noise[0], "model": "base", "seed": 1},
                                                                 {"b64_json": noise[1], "model": "lora-a", "seed": 1}])
    assert len(json.dumps(body)) > 300_000
    status, js, _ = site.call("POST", "/v1/feedback", body)
    assert status == 200, js
    rows = [r for r in export(site.db, tmp_path / "fb.parquet") if r["ranking_id"] == body["id"]]
    assert len(rows) == 1 and Image.open(io.BytesIO(rows[0]["jpg_0"])).size == (200, 200)


def test_a_feedback_post_is_stored_once_and_exported(site, tmp_path):
    body = pair_body(id="api-test-" + uuid.uuid4().hex[:12], choice="right")
    first, again = site.call("POST", "/v1/feedback", body), site.call("POST", "/v1/feedback", body)
    assert first[0] == again[0] == 200 and again[1] == {**first[1], "duplicate": True}
    rows = [r for r in export(site.db, tmp_path / "fb.parquet") if r["ranking_id"] == body["id"]]
    assert len(rows) == 1 and (rows[0]["label_0"], rows[0]["label_1"]) == (0.0, 1.0)
    assert rows[0]["model_1"] == "lora-a" and rows[0]["caption"] == "a red circle"


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture()
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (make browser-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _set(driver, element_id: str, value: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


def test_playground_generate_compare_prefer_and_export(site, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(site.url + "/")
    _wait(d, lambda d: "401" in _text(d, "error"))  # no key yet: a readable message, not a blank page
    assert "API key" in _text(d, "error")
    _set(d, "api-key", KEY)
    d.find_element("id", "save-key").click()
    _wait(d, lambda d: len(Select(d.find_element("id", "model")).options) >= 2 and not _text(d, "error"))
    _set(d, "prompt", HOSTILE_PROMPT)
    _set(d, "steps", "2")
    _set(d, "seed", "5")
    _set(d, "width", "60")  # not a multiple of 8: the API's message is shown
    d.find_element("id", "generate").click()
    _wait(d, lambda d: "width" in _text(d, "error") and "multiple of 8" in _text(d, "error"))
    _set(d, "width", "64")
    d.find_element("id", "generate").click()
    _wait(d, lambda d: len(d.find_elements("css selector", "#gallery figure")) == 1)
    caption = d.find_element("css selector", "#gallery figcaption .prompt")
    assert caption.text == HOSTILE_PROMPT  # shown as text
    assert d.execute_script("return window.__pwned === undefined && "
                            "document.querySelectorAll('#gallery script, #gallery figcaption img').length === 0")
    Select(d.find_element("id", "left-model")).select_by_value("base")
    Select(d.find_element("id", "right-model")).select_by_value("lora-a")
    d.find_element("id", "compare").click()
    _wait(d, lambda d: d.find_element("id", "prefer-right").is_enabled())
    d.find_element("id", "prefer-right").click()
    _wait(d, lambda d: _text(d, "feedback-status").startswith("Recorded: right"))
    feedback_id = _text(d, "feedback-status").rsplit("(", 1)[1].rstrip(")")
    d.get(site.url + "/?left=lora-a&right=base")  # what `diffray feedback train` suggests after publishing
    _wait(d, lambda d: len(Select(d.find_element("id", "model")).options) >= 2)
    assert not _text(d, "error")  # the key is kept for the tab: models load again without asking
    picked = [Select(d.find_element("id", f"{side}-model")).first_selected_option.get_attribute("value")
              for side in ("left", "right")]
    assert picked == ["lora-a", "base"]
    d.get(site.url + "/?left=../etc&right=nope")  # ids the server does not list are ignored
    _wait(d, lambda d: len(Select(d.find_element("id", "model")).options) >= 2)
    assert [Select(d.find_element("id", f"{side}-model")).first_selected_option.get_attribute("value")
            for side in ("left", "right")] == ["base", "lora-a"]
    shot = Path(os.environ.get("DIFFRAY_SCREENSHOT") or tmp_path / "playground.png")
    _show_result_for_screenshot(d)
    shot.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shot))
    rows = [r for r in export(site.db, tmp_path / "fb.parquet") if r["ranking_id"] == feedback_id]
    assert len(rows) == 1 and rows[0]["choice"] == "right" and rows[0]["caption"] == HOSTILE_PROMPT
    assert (rows[0]["model_0"], rows[0]["model_1"], rows[0]["label_0"]) == ("base", "lora-a", 0.0)


def _show_result_for_screenshot(d) -> None:
    """A page worth a screenshot: a plain prompt, a comparison on screen, a few results in the gallery."""
    _set(d, "prompt", "a red circle on a white background")
    _set(d, "steps", "8")
    d.find_element("id", "generate").click()
    _wait(d, lambda d: len(d.find_elements("css selector", "#gallery figure")) >= 1)
    d.find_element("id", "compare").click()
    _wait(d, lambda d: d.find_element("id", "prefer-left").is_enabled())


# ------------------------------------------------------------------------------------- robustness (slow)
def _ingress_actors() -> list[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"]["Ingress"]["replicas"]
    return [r["actor_name"] for r in replicas if r["state"] == "RUNNING"]


def _post_until_accepted(site, body: dict, log: list) -> str:
    """POST with retries through a restart (connection errors, 5xx, 404 while routes come back)."""
    for attempt in range(200):
        try:
            status, js, _ = site.call("POST", "/v1/feedback", body, timeout=60)
        except OSError as exc:
            log.append(type(exc).__name__)
        else:
            if status == 200:
                return js["id"]
            assert status >= 500 or status == 404, js  # only a restart may refuse a well-formed post
            log.append(status)
        time.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
    raise AssertionError(f"never accepted: {log[-5:]}")


@pytest.mark.slow
@pytest.mark.eval  # CI: the feedback store's unit tests and the feedback loop e2e (test_feedback_loop.py)
def test_200_concurrent_posts_with_a_restart_are_each_exported_exactly_once(site, tmp_path):
    import ray

    bodies = [pair_body(prompt=f"prompt {i}", id=f"robust-{i:04d}-{uuid.uuid4().hex[:8]}",
                        choice=["left", "right", "tie", "both_bad"][i % 4]) for i in range(200)]
    log: list = []
    killed = threading.Event()

    def post(i):
        if i == 60:  # a third of the way in: both Ingress replicas die mid-stream
            for name in _ingress_actors():
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed.set()
        return _post_until_accepted(site, bodies[i], log)

    with ThreadPoolExecutor(8) as pool:
        accepted = list(pool.map(post, range(200)))
    assert killed.is_set() and accepted == [b["id"] for b in bodies]
    rows = export(site.db, tmp_path / "fb.parquet")
    ids = [r["ranking_id"] for r in rows if r["ranking_id"].startswith("robust-")]
    assert sorted(ids) == sorted(accepted)  # every accepted post, each exactly once
    print(f"robustness: 200 accepted, {len(log)} retried attempts during the restart: {sorted(set(map(str, log)))}")

"""The dashboard (issue #10) in Debian's headless chromium against the real service: API under uvicorn,
real Redis, a real Celery worker. Sign in, submit a tiny job from the form, watch its curves gain points
from the event stream without a reload, cancel another job, call ``/act`` and export from the policy page.

Screenshots go to ``$CVPO_TEST_ARTEFACTS/dashboard`` (default ``<tmp>/screenshots``); their paths are printed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import TINY_SPEC, TOKEN, Service
from tests.e2e.ui_helpers import Browser, artefacts_dir, chromium, running_api, severe, with_dashboard

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_pages_are_public_shells_with_strict_headers(service: Service) -> None:
    from api.app import create_app

    with TestClient(with_dashboard(create_app(service.settings))) as client:
        for path, page in (("/", "jobs"), ("/ui/jobs/job_1", "job"), ("/ui/policies/pol_1", "policy")):
            r = client.get(path)  # no token: the shells hold no data
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith("text/html")
            assert f'data-page="{page}"' in r.text
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "<script>" not in r.text, "no inline script (the CSP would block it anyway)"
            assert not re.search(r'(src|href)="(https?:)?//', r.text), "nothing loads from another origin"
        evil = client.get("/ui/jobs/x%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
        assert evil.status_code == 200 and "<img" not in evil.text and "x&quot;&gt;&lt;img" in evil.text
        js = client.get("/ui/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/app.js", headers={"If-None-Match": js.headers["etag"]}).status_code == 304
        assert client.get("/ui/static/style.css").headers["content-type"].startswith("text/css")
        for bad in ("/ui/static/nope.js", "/ui/static/base.html", "/ui/static/..%2Fapp.js"):
            assert client.get(bad).status_code == 404, bad
        assert client.get("/jobs").status_code == 401, "the JSON API still needs the token"
        paths = client.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui")], "pages stay out of the API schema"


@pytest.mark.slow
def test_dashboard_end_to_end_in_chromium(service: Service, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    started = time.monotonic()
    service.start_worker()  # boots while the browser starts
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shots = artefacts_dir(tmp_path)
    with running_api(service.settings) as base:
        http = httpx.Client(base_url=base, headers=AUTH, timeout=10)
        driver = chromium(downloads)
        b = Browser(driver, shots)
        try:
            # ---- sign in: a wrong token is refused, the right one (typed, Enter) opens the jobs page
            driver.get(base + "/")
            token = b.wait(lambda: driver.find_element(By.ID, "token"), 15, "the token prompt")
            assert token.is_displayed() and token == driver.switch_to.active_element, "the prompt has focus"
            b.assert_accessible_basics()
            b.shot("token-prompt")
            token.send_keys("wrong-token", Keys.ENTER)
            b.wait(lambda: "401" in b.text("#login-error"), 15, "a wrong token to be refused")
            driver.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
            b.wait(lambda: driver.find_element(By.ID, "app").is_displayed(), 15, "the jobs page after sign-in")
            b.wait(lambda: len(Select(driver.find_element(By.ID, "f-env")).options) > 10, 15, "the task list")
            b.assert_accessible_basics()

            # ---- submit the tiny job from the form (keyboard: Enter in a field submits)
            assert driver.find_element(By.ID, "new-job").get_attribute("open") is not None, "no jobs: form open"
            Select(driver.find_element(By.ID, "f-env")).select_by_value(TINY_SPEC["env_id"])
            assert driver.find_element(By.ID, "f-limit").get_attribute("value") == "25", "the task's default limit"
            assert "circle" in b.text("#preset-info"), "the task's preset is described"
            # A limit the tiny policy meets, so that its job ends with a certified policy (conftest).
            fields = (("f-steps", TINY_SPEC["total_env_steps"]), ("f-seed", 1), ("f-eval", 1), ("f-limit", 1000))
            for field, value in fields:
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(str(value))
            driver.find_element(By.CSS_SELECTOR, "#job-form summary").click()
            hyper = driver.find_element(By.ID, "f-hyper")
            hyper.clear()
            hyper.send_keys(json.dumps(TINY_SPEC["hyperparams"]))
            b.shot("job-form-filled")
            driver.find_element(By.ID, "f-steps").send_keys(Keys.ENTER)
            tiny_id = b.wait(lambda: driver.find_element(By.CSS_SELECTOR, "#flash a").text, 20, "the new job's link")
            assert tiny_id.startswith("job_")
            row = b.wait(lambda: driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{tiny_id}"]'), 10, "its row")
            assert "SafetyPointCircle1-v0" in row.text and "1/3" in row.text
            spec = http.get(f"/jobs/{tiny_id}").json()["spec"]
            assert spec["hyperparams"] == TINY_SPEC["hyperparams"] and spec["eval"] == {"episodes": 1}

            # A long job to cancel later (queued behind the tiny one on the single worker).
            long_spec = {**TINY_SPEC, "total_env_steps": 1_000_000, "seed": 2}
            long_id = http.post("/jobs", json=long_spec).json()["id"]
            b.wait(lambda: driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{long_id}"]'), 10, "the 2nd job's row")
            b.shot("jobs-table")

            # ---- the tiny job's page: curves gain points from the event stream, no reload
            driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{tiny_id}"] a').click()
            b.wait(lambda: driver.find_element(By.CSS_SELECTOR, "#chart-reward svg"), 15, "the reward chart")
            b.js("window.__sameDocument = true;")

            def points(chart: str = "reward") -> int:  # read in one script: the charts are redrawn live
                return int(b.js(f"return document.querySelector('#chart-{chart} svg').dataset.points;"))

            first = points()
            assert first < 3, f"the job finished before its page loaded ({first} points); nothing live to watch"
            b.wait(lambda: points() > first, 90, "the reward curve to gain a point")
            b.shot("job-training")
            b.wait(lambda: b.text("#job-status") == "succeeded", 90, "the tiny job to succeed")
            b.wait(lambda: points() == 3, 15, "all three epochs on the curve")
            assert b.js("return window.__sameDocument === true;"), "the page reloaded instead of updating live"
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-live") == "stream", "SSE, not polling"
            assert driver.find_elements(By.CSS_SELECTOR, "#chart-cost path.limit"), "the cost limit line"
            assert points("lambda") == 3 and points("cost") == 3, "λ and cost over time"
            assert '"episodes": 1' in driver.find_element(By.ID, "job-spec").get_attribute("textContent")
            driver.find_element(By.CSS_SELECTOR, "#charts-h ~ details summary").click()
            b.wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#points-table tbody tr")) == 3, 5, "the table")
            assert not driver.find_element(By.ID, "cancel-job").is_displayed(), "no cancel on a finished job"
            policy_href = b.wait(
                lambda: driver.find_element(By.CSS_SELECTOR, "#job-policies a").get_attribute("href"), 15, "its policy"
            )
            b.wait(lambda: "upper bound" in b.text("#job-certificate"), 15, "the promoted policy's certificate")
            # The job page shows the cost critic's calibration on the certification episodes too.
            assert "Cost critic at the start states" in b.text("#job-cert-critic-calibration")
            assert "CERTIFIED" in b.text("#job-policies li") and "NOT" not in b.text("#job-policies li")
            # Promote the final checkpoint too: a second version of the job's policy.
            Select(b.wait(lambda: driver.find_element(By.ID, "promote-ckpt"), 15, "the promote form")).select_by_value(
                "final"
            )
            driver.find_element(By.CSS_SELECTOR, "#promote button").click()
            b.wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#job-policies a")) == 2, 15, "a 2nd policy")
            b.assert_accessible_basics()
            b.shot("job-succeeded")

            # ---- cancel the long job from its page
            driver.get(f"{base}/ui/jobs/{long_id}")
            cancel = b.wait(lambda: driver.find_element(By.ID, "cancel-job"), 15, "the cancel button")
            b.wait(lambda: cancel.is_displayed() and cancel.is_enabled(), 15, "the cancel button to be usable")
            cancel.click()
            b.wait(lambda: driver.switch_to.alert, 5, "the confirmation dialog").accept()
            b.wait(lambda: b.text("#job-status") in ("cancelling", "cancelled"), 15, "the job to be cancelling")
            b.wait(lambda: b.text("#job-status") == "cancelled", 60, "the job to be cancelled")
            assert http.get(f"/jobs/{long_id}").json()["status"] == "cancelled"
            b.shot("job-cancelled")

            # ---- the policy page: metadata, versions, /act, export
            driver.get(policy_href)
            b.wait(lambda: "sha256" in b.text("#policy-meta"), 15, "the policy's metadata")
            policy_id = policy_href.rsplit("/", 1)[1]
            meta = http.get(f"/policies/{policy_id}").json()
            assert meta["sha256"] in b.text("#policy-meta") and tiny_id in b.text("#policy-meta")
            # The certificate: badge, per-constraint mean / upper bound / limit, episodes.
            assert b.text("#policy-certified") == "CERTIFIED" and meta["certified"] is True
            cert_rows = driver.find_elements(By.CSS_SELECTOR, "#policy-cert-constraints tbody tr")
            c = meta["certificate"]["constraints"][0]
            assert len(cert_rows) == 1 and cert_rows[0].text.split()[:2] == ["cost", "1,000"], cert_rows[0].text
            assert f"{c['cost_upper_bound']:.2f}" in cert_rows[0].text and f"{c['cost_mean']:.2f}" in cert_rows[0].text
            assert f"{meta['certificate']['episodes']} deterministic" in b.text("#policy-cert-facts")
            # Trained policies carry their cost critics; the certificate's calibration is one line.
            cal = meta["certificate"]["critic_calibration"]
            assert meta["has_cost_critic"] is True and cal["episodes"] == meta["certificate"]["episodes"]
            line = b.text("#policy-cert-critic-calibration")
            assert line.startswith("Cost critic at the start states") and "cost predicted" in line, line
            assert "realised" in line and "/act can return cost_to_go" in b.text("#policy-meta")
            b.wait(lambda: "(this one)" in b.text("#policy-versions"), 10, "the versions list")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#policy-versions li")) == 2, "both versions listed"
            assert "No aliases" in b.text("#policy-aliases")
            obs_dim = meta["observation_space"]["shape"][0]
            obs = [0.1 * ((i % 7) - 3) for i in range(obs_dim)]
            box = driver.find_element(By.ID, "act-obs")
            box.clear()
            box.send_keys(", ".join(f"{x:.1f}" for x in obs))
            driver.find_element(By.ID, "act-submit").click()
            b.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#act-table tbody tr"), 15, "the /act answer")
            want = http.post(f"/policies/{policy_id}/act", json={"observations": [[round(x, 1) for x in obs]]}).json()
            cells = driver.find_elements(By.CSS_SELECTOR, "#act-table tbody td")
            assert cells[1].text == "[" + ", ".join(f"{a:.4f}" for a in want["actions"][0]) + "]"
            assert cells[2].text == ("yes" if want["clipped"][0] else "no")
            box.clear()
            box.send_keys("1, 2, oops")
            driver.find_element(By.ID, "act-submit").click()
            b.wait(lambda: "oops" in b.text("#act-error"), 5, "a bad observation to be named")
            driver.find_element(By.ID, "act-zeros").click()
            driver.find_element(By.ID, "act-submit").click()
            b.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#act-table tbody tr"), 15, "the /act answer")
            driver.find_element(By.ID, "export-bundle").click()
            b.wait(lambda: "Downloaded" in b.text("#export-status"), 30, "the bundle export")
            b.wait(lambda: (downloads / f"{policy_id}.zip").exists(), 15, "the downloaded bundle file")
            b.assert_accessible_basics()
            b.shot("policy")

            # ---- a box-shielded version of the same checkpoint says when the shield stepped in
            shield = {"type": "box", "low": [-0.01, -0.01], "high": [0.01, 0.01]}
            shielded = http.post("/policies", json={"job_id": tiny_id, "checkpoint_id": "best", "shield": shield})
            assert shielded.status_code == 201, shielded.text
            driver.get(f"{base}/ui/policies/{shielded.json()['id']}")
            b.wait(lambda: "type: box" in b.text("#policy-shield"), 15, "the shield settings")
            b.wait(lambda: driver.find_element(By.ID, "act-obs").get_attribute("value").startswith("0"), 5, "zeros")
            driver.find_element(By.ID, "act-submit").click()
            b.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#act-table tbody tr"), 15, "the shielded answer")
            want = http.post(f"/policies/{shielded.json()['id']}/act", json={"observations": [[0.0] * obs_dim]}).json()
            cells = driver.find_elements(By.CSS_SELECTOR, "#act-table tbody td")
            assert cells[3].text.startswith("yes" if want["shield"]["applied"][0] else "no"), cells[3].text
            b.shot("policy-shielded")

            # ---- back to the jobs table: both jobs in their final states
            driver.get(base + "/")
            b.wait(lambda: "cancelled" in b.text(f'tr[data-job="{long_id}"]'), 15, "the cancelled row")
            assert "succeeded" in b.text(f'tr[data-job="{tiny_id}"]') and "100%" in b.text(f'tr[data-job="{tiny_id}"]')
            b.assert_accessible_basics()
            b.shot("jobs-final")

            problems = severe(b.collect_console(), allowed=("401",))
            assert problems == [], f"browser console errors: {problems}"
        finally:
            driver.quit()
            http.close()
    elapsed = time.monotonic() - started
    print(f"dashboard e2e: {elapsed:.1f} s; screenshots in {shots}")

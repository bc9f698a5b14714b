"""The district console in a real browser (headless Chromium, Selenium) against a real
mosquitto, a real agent and ``ttcs-ctl serve`` (relay + console in one process): login, the
fleet live, an operator's TTS bulletin to their commune with its acks and proof-of-play, and
the refusals (another commune, emergency without the grant, CSRF-less and logged-out posts).

One browser and one set of processes for the module; the tests run in file order."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time

import pytest
import requests
import yaml

from tests.conftest import AgentProcess, Broker, Keys, Watcher, agent_config, free_port, wait_until
from tests.console_support import (
    CHROMEDRIVER,
    CHROMIUM,
    Serve,
    add_user,
    browser,
    ctl_config,
    login,
)

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="needs chromium and chromium-driver (scripts/setup)")

DEVICE = "krongpa-phutuc-c03"
SHOTS = os.environ.get("TTCS_SCREENSHOTS")  # a folder: save the pages' screenshots there


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from selenium.webdriver.common.by import By  # noqa: F401  (selenium must import)

    folder = tmp_path_factory.mktemp("console")
    with contextlib.ExitStack() as stack:  # whatever started is stopped, also on a failure
        broker = Broker(folder / "broker").start()
        stack.callback(broker.stop)
        keys = Keys()
        port = free_port()
        config = ctl_config(folder, broker.port, keys, port)
        add_user(config, folder, "admin", "admin")
        add_user(config, folder, "op-phutuc", "operator", "--groups", "phutuc")
        add_user(config, folder, "xem", "viewer")
        agent_yaml = agent_config(folder, broker.port, keys, DEVICE)
        cfg = yaml.safe_load(agent_yaml.read_text())
        cfg["device"]["groups"] = ["krongpa", "phutuc"]  # the commune it belongs to
        cfg["security"]["media_hosts"] = ["127.0.0.1"]  # the console hosts the uploads
        cfg["board"] = {"driver": "image", "width": 64, "height": 16,
                        "image_path": str(folder / "board.png")}  # the LED board, as a PNG
        agent_yaml.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        agent = AgentProcess(agent_yaml, folder / "agent.log").start()
        stack.callback(agent.stop)
        serve = Serve(config, port, folder / "serve.log")
        codes = []
        stack.callback(lambda: codes.append(serve.stop()))
        serve.start()
        watcher = Watcher(broker.port, ["ttcs/+/+/cmd"])
        stack.callback(watcher.close)
        driver = browser()
        stack.callback(driver.quit)
        driver.implicitly_wait(0)
        ns = type("Env", (), {})()
        ns.folder, ns.broker, ns.keys, ns.config, ns.agent, ns.serve = \
            folder, broker, keys, config, agent, serve
        ns.driver, ns.watcher, ns.base, ns.db = driver, watcher, serve.url, folder / "relay.db"
        yield ns
    assert codes == [0], serve.log()[-3000:]


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].text if els else ""


def _attr(driver, css: str, name: str) -> str | None:
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].get_attribute(name) if els else None


def _shot(driver, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def _session(env) -> tuple[requests.Session, str]:
    """The browser's session cookie and CSRF token, for crafted requests."""
    from selenium.webdriver.common.by import By

    env.driver.get(env.base + "/bulletins")
    csrf = env.driver.find_element(By.CSS_SELECTOR, "meta[name=csrf]").get_attribute("content")
    s = requests.Session()
    s.cookies.set("ttcs_session", env.driver.get_cookie("ttcs_session")["value"])
    return s, csrf


def _audit(env, action: str, outcome: str) -> list[dict]:
    con = sqlite3.connect(env.db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(
            "SELECT * FROM console_audit WHERE action LIKE ? AND outcome=?", (action, outcome))]
    finally:
        con.close()


def test_login_required_then_operator_logs_in(env):
    d = env.driver
    assert requests.get(env.base + "/healthz", timeout=5).status_code == 200
    d.get(env.base + "/")
    assert d.current_url.startswith(env.base + "/login")  # not logged in: the login form
    login(d, env.base, "op-phutuc", "wrong password!")
    wait_until(lambda: "Sai tên đăng nhập" in _text(d, "#login-error"), 10,
               what="the login error")
    login(d, env.base, "op-phutuc")
    wait_until(lambda: d.current_url == env.base + "/", 10, what="fleet after login")
    wait_until(lambda: "op-phutuc" in _text(d, "#me"), 10, what="the user's name")
    cookie = d.get_cookie("ttcs_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert _audit(env, "login", "ok") and _audit(env, "login", "refused")


def test_fleet_shows_the_agent_online(env):
    d = env.driver
    row = f"#dev-{DEVICE} td.status"
    wait_until(lambda: _attr(d, row, "data-status") in ("online", "playing"), 20,
               what="the agent online on the fleet page (live, no reload)")
    assert _text(d, "[data-count=total]") == "1"
    assert _text(d, "[data-count=online]") == "1"
    assert _attr(d, f"circle[data-device={DEVICE}]", "class") is not None  # on the map
    _shot(d, "fleet")


def test_operator_sends_tts_bulletin_and_sees_done_and_proof_of_play(env):
    from selenium.webdriver.common.by import By

    d = env.driver
    d.get(env.base + "/bulletins")
    offered = {e.get_attribute("value") for e in d.find_elements(By.NAME, "target")}
    assert "grp/phutuc" in offered and "grp/chuse" not in offered and "grp/all" not in offered
    priorities = {e.get_attribute("value") for e in d.find_elements(By.CSS_SELECTOR,
                                                                     "#priority option")}
    assert priorities == {"normal", "priority"}  # no emergency without the grant
    d.find_element(By.ID, "text").send_keys("Thông báo: sáng mai tiêm chủng tại trạm y tế xã.")
    d.find_element(By.CSS_SELECTOR, "input[name=target][value='grp/phutuc']").click()
    _shot(d, "bulletin")
    d.find_element(By.ID, "send").click()
    wait_until(lambda: "/sent/" in d.current_url, 10, what="the sent page")
    cmd_id = d.find_element(By.CSS_SELECTOR, "section.cmd").get_attribute("data-cmd")
    wait_until(lambda: _text(d, f"#final-{cmd_id}") == "done", 30,
               what="the agent's done ack shown live")
    stages = [e.text for e in d.find_elements(By.CSS_SELECTOR, f"#acks-{cmd_id} td.stage")]
    assert stages[0] == "received" and stages[-1] == "done", stages
    from datetime import datetime

    times = [datetime.strptime(e.text, "%H:%M:%S %d/%m/%Y") for e in d.find_elements(
        By.CSS_SELECTOR, f"#acks-{cmd_id} td:first-child")]  # server- and browser-written
    assert (max(times) - min(times)).total_seconds() < 60, times  # one zone: the district's
    _shot(d, "sent")
    sent = [json.loads(p) for t, p, _ in env.watcher.messages if t == "ttcs/grp/phutuc/cmd"]
    assert [m["id"] for m in sent] == [cmd_id]
    assert sent[0]["type"] == "say" and sent[0]["sig"]["kid"] == env.keys.kid

    def proof():
        d.get(f"{env.base}/devices/{DEVICE}")
        rows = d.find_elements(By.CSS_SELECTOR, f"#plays tr[data-id='{cmd_id}']")
        return rows[0] if rows else None

    row = wait_until(proof, 20, interval=0.5, what="the play record on the device page")
    assert row.find_element(By.CSS_SELECTOR, ".result").text == "done"
    assert row.find_element(By.CSS_SELECTOR, ".played").text.endswith(" s")
    assert cmd_id in _text(d, "#acks")
    _shot(d, "device")
    trail = _audit(env, "bulletin say", "ok")
    assert [r["cmd_id"] for r in trail] == [cmd_id] and trail[0]["username"] == "op-phutuc"


def test_operator_uploads_a_recording_that_the_agent_fetches_from_the_console(env):
    """The console is the media host: the agent downloads the upload from ``/media/`` (and
    checks its sha256), airs it, and the operator sees ``done``."""
    import wave

    from selenium.webdriver.common.by import By

    path = env.folder / "ban-tin.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 4000)  # half a second
    d = env.driver
    d.get(env.base + "/bulletins")
    d.find_element(By.ID, "mode-file").click()
    d.find_element(By.NAME, "file1").send_keys(str(path))
    d.find_element(By.CSS_SELECTOR, "details summary").click()  # the list of devices
    d.find_element(By.CSS_SELECTOR, f"input[name=target][value='dev/{DEVICE}']").click()
    d.find_element(By.ID, "send").click()
    wait_until(lambda: "/sent/" in d.current_url, 10, what="the sent page")
    cmd_id = d.find_element(By.CSS_SELECTOR, "section.cmd").get_attribute("data-cmd")
    wait_until(lambda: _text(d, f"#final-{cmd_id}") == "done", 30,
               what="the recording aired (done)")
    # The relay sends commands of its own (resend probes): find this one by its id.
    [cmd] = [c for c in (json.loads(p) for t, p, _ in env.watcher.messages
                         if t == f"ttcs/dev/{DEVICE}/cmd") if c.get("id") == cmd_id]
    media = cmd["args"]["media"]
    assert media["url"].startswith(env.base + "/media/") and cmd["type"] == "play"
    assert (env.folder / "media" / media["url"].rsplit("/", 1)[1]).read_bytes() == \
        path.read_bytes()


def test_operator_cannot_reach_another_commune_even_by_crafted_post(env):
    s, csrf = _session(env)
    before = len(env.watcher.messages)
    for target in ("grp/chuse", "dev/krongpa-chuse-c01", "grp/all", "grp/krongpa"):
        r = s.post(env.base + "/bulletins", data={"csrf": csrf, "mode": "tts", "text": "x",
                                                 "target": target, "priority": "normal"},
                   allow_redirects=False, timeout=10)
        assert r.status_code == 403, (target, r.status_code)
        assert "không có quyền" in r.text.lower()
    time.sleep(0.5)
    assert len(env.watcher.messages) == before  # nothing published
    refused = _audit(env, "bulletin", "refused")
    assert {r["target"] for r in refused} >= {"grp/chuse", "dev/krongpa-chuse-c01"}


def test_emergency_without_the_grant_is_refused(env):
    s, csrf = _session(env)
    before = len(env.watcher.messages)
    r = s.post(env.base + "/bulletins", data={"csrf": csrf, "mode": "tts", "text": "Bão!",
                                             "target": "grp/phutuc", "priority": "emergency"},
               allow_redirects=False, timeout=10)
    assert r.status_code == 403 and "khẩn cấp" not in r.text.split("<main>")[0]
    assert "emergency" in r.text
    time.sleep(0.5)
    assert len(env.watcher.messages) == before
    assert any("emergency" in (r["detail"] or "") for r in _audit(env, "bulletin", "refused"))


def test_csrf_less_and_logged_out_posts_are_refused(env):
    s, csrf = _session(env)
    before = len(env.watcher.messages)
    data = {"mode": "tts", "text": "x", "target": "grp/phutuc", "priority": "normal"}
    no_token = s.post(env.base + "/bulletins", data=data, allow_redirects=False, timeout=10)
    wrong = s.post(env.base + "/bulletins", data={**data, "csrf": csrf[:-2] + "xx"},
                   allow_redirects=False, timeout=10)
    logged_out = requests.post(env.base + "/bulletins", data={**data, "csrf": csrf},
                               allow_redirects=False, timeout=10)
    assert (no_token.status_code, wrong.status_code, logged_out.status_code) == (403, 403, 401)
    assert requests.get(env.base + "/alerts", allow_redirects=False,
                        timeout=10).status_code == 303  # every page but /healthz needs login
    time.sleep(0.5)
    assert len(env.watcher.messages) == before
    assert len([r for r in _audit(env, "POST /bulletins", "refused")]) == 3


def test_admin_sees_the_audit_with_final_stages_and_every_page(env):
    from selenium.webdriver.common.by import By

    d = env.driver
    d.find_element(By.CSS_SELECTOR, "form.who button").click()  # log out (a CSRF'd POST)
    wait_until(lambda: "/login" in d.current_url, 10, what="logged out")
    d.get(env.base + "/audit")
    assert "/login" in d.current_url  # the old session is gone
    login(d, env.base, "admin")
    wait_until(lambda: "admin" in _text(d, "#me"), 10, what="admin logged in")
    d.get(env.base + "/audit")
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")]
    say = [r for r in rows if "bulletin say" in r]
    assert len(say) == 1 and "op-phutuc" in say[0] and "grp/phutuc" in say[0]
    assert " ok done " in f" {say[0]} "  # outcome, then the command's final stage
    assert any("logout" in r for r in rows) and any("refused" in r for r in rows)
    _shot(d, "audit")
    for path, heading in (("/alerts", "Cảnh báo"), ("/schedule", "Lịch phát"),
                          ("/board", "Bảng tin"), ("/reports", "Thống kê"),
                          ("/bulletins", "Gửi bản tin")):
        d.get(env.base + path)
        assert _text(d, "h1").startswith(heading), (path, _text(d, "h1"))
        if path in ("/alerts", "/reports"):
            _shot(d, path.strip("/"))
    d.set_window_size(390, 844)  # a phone
    d.get(env.base + "/")
    assert _text(d, "[data-count=total]") == "1"
    _shot(d, "fleet-phone")
    d.set_window_size(1280, 900)


def _push(env, kind: str, target: str, fill) -> None:
    """Open the page, ``fill(driver)`` an edit and submit it, see the diff, push; wait for
    the agent's ``applied``."""
    d = env.driver
    d.get(f"{env.base}/{kind}?target={target}")
    fill(d)
    wait_until(lambda: _text(d, "#diff"), 10, what=f"the {kind} diff")
    assert "+" in _text(d, "#diff")
    from selenium.webdriver.common.by import By

    d.find_element(By.ID, "push").click()

    def applied():
        d.get(f"{env.base}/{kind}?target={target}")
        return DEVICE in _text(d, "#results") and "applied" in _text(d, "#results")

    wait_until(applied, 20, interval=0.5, what=f"the agent's {kind} result")


def test_admin_pushes_a_schedule_and_board_content_and_the_agent_applies_them(env):
    from selenium.webdriver.common.by import By

    def add_item(d, item_id: str, times: str, say: str) -> None:  # the table's form
        d.find_element(By.CSS_SELECTOR, "details.add summary").click()
        form = d.find_element(By.ID, "add-item")
        form.find_element(By.NAME, "item_id").send_keys(item_id)
        form.find_element(By.NAME, "times").send_keys(times)
        form.find_element(By.NAME, "say").send_keys(say)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    _push(env, "schedule", "grp/phutuc",
          lambda d: add_item(d, "ban-tin-sang", "05:30", "Bản tin sáng của xã Phú Túc"))
    _push(env, "schedule", "grp/phutuc",
          lambda d: add_item(d, "ban-tin-chieu", "17:00", "Bản tin chiều"))
    items = _text(env.driver, "#items")
    assert "ban-tin-sang" in items and "ban-tin-chieu" in items and "05:30" in items
    _shot(env.driver, "schedule")

    def yaml_edit(d) -> None:  # the whole document as YAML
        d.find_element(By.CSS_SELECTOR, "details:not(.add) summary").click()
        box = d.find_element(By.ID, "yaml")
        box.clear()
        box.send_keys("messages:\n- id: chao\n  text: UBND xã Phú Túc kính chào quý khách\n"
                      "- id: bao\n  text: Phòng chống bão số 3\nrotate_s: 8\n")
        d.find_element(By.ID, "check").click()

    _push(env, "board", "grp/phutuc", yaml_edit)
    imgs = env.driver.find_elements(By.CSS_SELECTOR, "#messages img.preview")
    assert len(imgs) == 2
    wait_until(lambda: all(env.driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", i) for i in imgs), 10,
        what="the previews rendered")
    _shot(env.driver, "board")
    trail = _audit(env, "% push", "ok")
    assert {r["target"] for r in trail} == {"grp/phutuc"} and len(trail) == 3


def test_fleet_shows_offline_within_2_s_of_sigkill(env):
    d = env.driver
    d.get(env.base + "/")
    row = f"#dev-{DEVICE} td.status"
    wait_until(lambda: _attr(d, row, "data-status") in ("online", "playing"), 10,
               what="online before the kill")
    wait_until(lambda: "up" in (_attr(d, "#live", "class") or ""), 5, what="live stream open")
    t0 = time.monotonic()
    env.agent.kill()  # SIGKILL: the broker publishes its will
    wait_until(lambda: _attr(d, row, "data-status") == "offline", 5, interval=0.05,
               what="offline on the fleet page")
    took = time.monotonic() - t0
    assert took <= 2.0, f"offline shown after {took:.2f} s"
    assert _text(d, "[data-count=offline]") == "1"
    assert "lost" in _text(d, row)
    _shot(d, "fleet-offline")

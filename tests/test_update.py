"""Updates over the air, end to end: real bundles built from this checkout, installed into
venvs under a temporary prefix, a real mosquitto, the real boot guard, and a supervisor that
does what the unit tells systemd to do (docs/UPDATE.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.update import install as installer
from agent.update.bundle import BundleError, extract, sha256_file
from agent.update.layout import Layout
from tests.conftest import ROOT, Broker, Keys, Watcher, agent_config
from tests.test_update_helpers import FileServer, Supervisor, make_bundle, make_wheelhouse

pytestmark = pytest.mark.timeout(600)

DEVICE = "krongpa-phutuc-c03"
BASE = "0.1.0"  # this checkout's version: what the cabinet runs before each test
# Faulty versions: each appends to a module a wrapper of one of its public names (not an edit
# of a source line, so the faults survive changes to the bodies they wrap).
CRASH = ("agent/app.py", "def run(config_path):\n"
                         "    raise RuntimeError('this version crashes at start')\n")
NO_BROKER = ("agent/app.py", "_build = build\n\n\n"
                             "def build(cfg):\n"
                             "    cfg['mqtt']['port'] = 9\n"
                             "    return _build(cfg)\n")
HANGS = ("agent/core/loop.py", "_fail_interrupted = Core._fail_interrupted\n\n\n"
                               "def _then_hang(self):\n"
                               "    _fail_interrupted(self)\n"
                               "    self.call_later(1, threading.Event().wait)\n\n\n"
                               "Core._fail_interrupted = _then_hang\n")
REFUSES = ("agent/config_checks.py", "_cross_checks = cross_checks\n\n\n"
                                     "def cross_checks(data, bad):\n"
                                     "    return [*_cross_checks(data, bad),"
                                     " ('device.id', 'refused by this version')]\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Bundles (base, good, crashing, never connecting, refusing the config) and a prefix
    with the base version installed and current, the boot guard beside it."""
    top = tmp_path_factory.mktemp("update")
    wheelhouse = make_wheelhouse(top / "wheelhouse")
    faults = {BASE: [], "0.2.0": [], "0.3.0": [CRASH], "0.4.0": [NO_BROKER],
              "0.5.0": [REFUSES], "0.6.0": [HANGS]}
    # pip does the work in subprocesses: build them side by side.
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {v: pool.submit(make_bundle, top, wheelhouse, v, patches)
                   for v, patches in faults.items()}
        bundles = {v: f.result() for v, f in futures.items()}
    prefix = top / "opt"
    layout = Layout(prefix)
    cfg = top / "base.yaml"
    cfg.write_text(f"device: {{id: {DEVICE}}}\n")
    layout.switch(installer.install(layout, bundles[BASE], version=BASE,
                                    config_path=str(cfg), like=None))
    shutil.copy(ROOT / "scripts" / "boot-guard", prefix / "boot-guard")
    server = FileServer(bundles[BASE].parent)
    yield {"prefix": prefix, "layout": layout, "bundles": bundles, "server": server,
           "wheelhouse": wheelhouse}
    server.close()


@pytest.fixture
def cabinet(site, tmp_path):
    """The base version current, no update in progress; a broker, a watcher, and a
    supervisor to start."""
    layout: Layout = site["layout"]
    layout.switch(f"venvs/{BASE}")
    layout.record_path.unlink(missing_ok=True)
    site["server"].ranges.clear()
    broker = Broker(tmp_path / "broker").start()
    watcher = Watcher(broker.port, ["ttcs/#"])
    keys = Keys()
    made: list[Supervisor] = []

    def start(**update) -> Supervisor:
        cfg = agent_config(tmp_path, broker.port, keys,
                           update={"prefix": str(site["prefix"]), "probation_s": 2,
                                   "max_failed_starts": 2, **update},
                           security={"media_hosts": ["127.0.0.1"]},
                           media={"backoff_s": 0.1})
        sup = Supervisor(site["prefix"], cfg, tmp_path / "supervisor.log").start()
        made.append(sup)
        wait_online(watcher)
        return sup

    yield {"start": start, "watcher": watcher, "keys": keys, **site}
    for sup in made:
        sup.stop()
    watcher.close()
    broker.stop()


def wait_online(watcher: Watcher, after: int = 0, timeout: float = 60) -> dict:
    def online():
        for s in watcher.json(f"dev/{DEVICE}/status"):
            if s.get("state") == "online" and s.get("session", 0) > after:
                return s
        return None
    return watcher.wait_for(online, timeout, what="online")


def send_update(cab, version: str, bundle: Path | None = None, **overrides) -> str:
    bundle = bundle or cab["bundles"][version]
    args = {"version": version, "url": cab["server"].url(bundle.name),
            "sha256": sha256_file(bundle), "size": bundle.stat().st_size, **overrides}
    env = cab["keys"].command(f"dev/{DEVICE}", "update", args)
    cab["watcher"].publish(f"ttcs/dev/{DEVICE}/cmd", env)
    return env["id"]


def stages(watcher: Watcher, cmd_id: str) -> list[str]:
    """The stages acked for ``cmd_id``, each ack once: final acks are delivered at least
    once (PROTOCOL.md, the outbox), so the same ack sent again after a reconnect is one ack
    (seen once in the suite: ``failed`` twice, under load); two different acks both count."""
    seen: list[dict] = []
    for a in watcher.acks(cmd_id):
        if a not in seen:
            seen.append(a)
    return [a["stage"] for a in seen]


def tone(cab, seconds: float) -> dict:
    """A media object for a tone of ``seconds`` served beside the bundles."""
    from agent.audio.tone import write_tone

    wav = cab["bundles"][BASE].parent / f"tone-{seconds:g}.wav"
    write_tone(str(wav), seconds=seconds)
    return {"url": cab["server"].url(wav.name), "sha256": sha256_file(wav)}


def running_version(cab) -> str:
    out = subprocess.run([str(cab["prefix"] / "venv" / "bin" / "ttcs-agent"), "version"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()[-1]


# --- the bundle --------------------------------------------------------------------------

def test_bundle_holds_every_wheel_and_is_checked_against_its_manifest(site, tmp_path):
    bundle = site["bundles"]["0.2.0"]
    manifest = extract(bundle, tmp_path / "ok")
    names = {Path(n).name.split("-")[0].lower() for n in manifest["files"]}
    assert manifest["version"] == "0.2.0"
    assert {"ttcs_agent", "paho_mqtt", "cryptography", "pyyaml", "requests"} <= names
    # One wheel changed after the manifest was written: refused.
    work = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", work)
    wheel = next(p for p in (work / "wheels").iterdir() if p.name.startswith("ttcs_agent"))
    wheel.write_bytes(wheel.read_bytes() + b"x")
    from agent.update.bundle import verify_folder
    with pytest.raises(BundleError, match="sha256"):
        verify_folder(work)


def test_release_build_command_reports_a_platform_without_wheels(site, tmp_path, capsys):
    from ctl.main import main

    wheels = ["--find-links", str(site["wheelhouse"]), "--no-index"]
    assert main(["release", "build", "--platform", "native", "--out", str(tmp_path / "a"),
                 *wheels]) == 0
    out = capsys.readouterr().out
    assert "native: every dependency has a wheel" in out and '"sha256": "' in out
    # This machine's wheels only, offline: nothing for 32-bit ARM; said, not silently built.
    assert main(["release", "build", "--platform", "armhf", "--out", str(tmp_path / "b"),
                 *wheels]) == 2
    assert "armhf: INCOMPLETE, no wheel for " in capsys.readouterr().out
    manifest = extract(next((tmp_path / "b").glob("*.tar")), tmp_path / "x")
    assert manifest["platforms"]["armhf"]["complete"] is False
    assert "pyyaml>=6" in manifest["platforms"]["armhf"]["missing"]


# --- good update -------------------------------------------------------------------------

def test_update_resumes_a_cut_download_switches_and_commits_after_probation(cabinet):
    sup = cabinet["start"]()
    w = cabinet["watcher"]
    first = wait_online(w)
    cabinet["server"].cuts = 3  # the download is cut three times half-way
    cmd = send_update(cabinet, "0.2.0")
    w.wait_ack(cmd, "started", timeout=30)
    offline = w.arrival(f"dev/{DEVICE}/status", lambda s: s.get("reason") == "shutdown",
                        timeout=120)
    # An emergency sent while the agent restarts airs on the new version (the broker keeps
    # the session's commands).
    emergency = cabinet["keys"].command(f"dev/{DEVICE}", "play", {
        "media": tone(cabinet, 0.5), "priority": "emergency"})
    w.publish(f"ttcs/dev/{DEVICE}/cmd", emergency)
    online = w.arrival(f"dev/{DEVICE}/status", lambda s: s.get("state") == "online"
                       and s["session"] > first["session"], timeout=60)
    done = w.wait_ack(cmd, "done", timeout=60)
    assert stages(w, cmd) == ["received", "queued", "started", "done"]
    w.wait_ack(emergency["id"], "done", timeout=20)
    assert done["detail"]["version"] == "0.2.0"
    assert running_version(cabinet) == "0.2.0"
    bundle = cabinet["bundles"]["0.2.0"].name
    ranges = [r for path, r in cabinet["server"].ranges if path.endswith(bundle)]
    assert ranges[0] is None and len(ranges) == 4 and all(r.startswith("bytes=") for r in ranges[1:])
    assert cabinet["layout"].read()["state"] == "committed"
    events = {e["seq"]: e["result"] for e in w.json(f"dev/{DEVICE}/event")
              if e.get("type") == "update"}  # at least once: a seq may come twice
    assert sorted(events.values()) == ["committed", "switched"]
    status = subprocess.run([str(cabinet["prefix"] / "venv" / "bin" / "ttcs-agent"), "status",
                             "--config", str(sup.config)], capture_output=True, text=True)
    assert "versions: running 0.2.0, previous 0.1.0" in status.stdout, status.stdout
    gap = online - offline
    print(f"restart gap (offline/shutdown -> online on the new version): {gap:.2f} s")
    assert gap < 10


# --- rollbacks ---------------------------------------------------------------------------

def rolled_back(cabinet, version: str) -> tuple[Supervisor, dict]:
    """Start the base version, update to ``version``; the final ack is failed/rolled_back
    and the base version runs again."""
    sup = cabinet["start"]()
    cmd = send_update(cabinet, version)
    failed = cabinet["watcher"].wait_ack(cmd, "failed", timeout=180)
    assert failed["reason"] == "rolled_back", failed
    assert failed["detail"]["version"] == version
    assert running_version(cabinet) == BASE
    assert stages(cabinet["watcher"], cmd) == ["received", "queued", "started", "failed"]
    return sup, failed


def test_version_that_crashes_at_start_is_rolled_back_by_the_boot_guard(cabinet):
    sup, failed = rolled_back(cabinet, "0.3.0")
    assert "2 starts of venvs/0.3.0 without a commit" in failed["detail"]["why"]
    assert sum(1 for code in sup.exits if code != 0) >= 2  # the crashing starts
    assert "rolled back to venvs/0.1.0" in sup.log()


def test_version_that_never_connects_gives_up_and_is_rolled_back(cabinet):
    _, failed = rolled_back(cabinet, "0.4.0")
    assert "not connected" in failed["detail"]["why"]


def test_version_whose_loop_hangs_is_aborted_by_the_watchdog_and_rolled_back(cabinet):
    sup, failed = rolled_back(cabinet, "0.6.0")
    assert sup.aborted >= 2  # no WATCHDOG=1 within WatchdogSec: SIGABRT, as systemd does
    assert "without a commit" in failed["detail"]["why"]


# --- refused before the switch -----------------------------------------------------------

def test_bad_bundles_fail_without_a_restart(cabinet):
    sup = cabinet["start"]()
    w = cabinet["watcher"]
    cmd = send_update(cabinet, "0.5.0")
    failed = w.wait_ack(cmd, "failed", timeout=120)
    assert failed["reason"] == "config", failed
    assert any("refused by this version" in line for line in failed["detail"]["problems"])
    cmd = send_update(cabinet, "0.2.0", without_a_dependency(cabinet, "paho_mqtt"))
    failed = w.wait_ack(cmd, "failed", timeout=120)
    assert failed["reason"] == "install", failed
    assert any("paho" in line for line in failed["detail"]["output"]), failed  # pip's last lines
    cmd = send_update(cabinet, "0.2.0", sha256="0" * 64)
    assert w.wait_ack(cmd, "failed", timeout=60)["reason"] == "media_checksum"
    cmd = send_update(cabinet, "0.2.0", size=2**40)
    assert w.wait_ack(cmd, "failed", timeout=30)["reason"] == "disk_space"
    assert len(sup.starts) == 1 and running_version(cabinet) == BASE
    assert not (cabinet["prefix"] / "venvs" / "0.5.0").exists()


def without_a_dependency(cabinet, prefix: str) -> Path:
    """The 0.2.0 bundle less one dependency's wheel, with a manifest that says so."""
    work = cabinet["prefix"].parent / f"less-{prefix}"
    shutil.rmtree(work, ignore_errors=True)
    manifest = extract(cabinet["bundles"]["0.2.0"], work)
    for name in [n for n in manifest["files"] if Path(n).name.startswith(prefix)]:
        (work / name).unlink()
        del manifest["files"][name]
    (work / "manifest.json").write_text(json.dumps(manifest))
    out = cabinet["bundles"]["0.2.0"].parent / f"less-{prefix}.tar"
    with tarfile.open(out, "w") as tar:
        for name in ["manifest.json", *manifest["files"]]:
            tar.add(work / name, name)
    return out


# --- the boot guard alone ----------------------------------------------------------------

def guard(prefix: Path) -> str:
    return subprocess.run(["/usr/bin/python3", str(ROOT / "scripts" / "boot-guard"),
                           "--prefix", str(prefix)], capture_output=True, text=True,
                          check=True).stdout


def test_boot_guard_counts_starts_then_switches_back(tmp_path):
    layout = Layout(tmp_path)
    for name in ("old", "new"):
        (layout.venvs / name).mkdir(parents=True)
    layout.switch("venvs/new")
    layout.write({"state": "probation", "from": "venvs/old", "to": "venvs/new", "starts": 0,
                  "max_failed_starts": 3})
    for n in (1, 2, 3):
        assert f"start {n}" in guard(tmp_path)
        assert layout.current() == "venvs/new"
    assert "rolled back" in guard(tmp_path)
    assert layout.current() == "venvs/old"
    assert layout.read()["state"] == "rolled_back"
    assert guard(tmp_path) == ""  # nothing more to do
    layout.record_path.write_text("{not json")
    assert "error (ignored)" in guard(tmp_path)  # and exit 0


def test_unit_runs_the_guard_before_the_agent():
    from tests.test_update_helpers import unit_settings
    s = unit_settings()
    assert s["ExecStartPre"][0].startswith("-/usr/bin/python3 /opt/ttcs-agent/boot-guard")
    assert "/opt/ttcs-agent" in s["ReadWritePaths"][0]




# --- when it may start -------------------------------------------------------------------

def test_update_waits_while_a_priority_item_airs(cabinet):
    sup = cabinet["start"]()
    w = cabinet["watcher"]
    play = cabinet["keys"].command(f"dev/{DEVICE}", "play", {
        "media": tone(cabinet, 4.0), "priority": "priority"})
    w.publish(f"ttcs/dev/{DEVICE}/cmd", play)
    w.wait_ack(play["id"], "started", timeout=20)
    cmd = send_update(cabinet, "0.2.0")
    queued = w.wait_ack(cmd, "queued")
    played = w.wait_ack(play["id"], "done", timeout=20)
    started = w.wait_ack(cmd, "started", timeout=20)
    assert queued["ts"] < played["ts"] <= started["ts"]
    w.wait_ack(cmd, "done", timeout=120)
    assert len(sup.starts) == 2


def test_update_waits_for_its_window(cabinet):
    now = datetime.now(ZoneInfo("Asia/Ho_Chi_Minh"))
    later = (now + timedelta(hours=2)).strftime("%H:%M")
    cabinet["start"](window=f"{later}-{(now + timedelta(hours=3)).strftime('%H:%M')}")
    w = cabinet["watcher"]
    cmd = send_update(cabinet, "0.2.0")
    w.wait_ack(cmd, "queued")
    time.sleep(3)
    assert stages(w, cmd) == ["received", "queued"]
    state = w.wait_for(lambda: next((s for s in reversed(w.json(f"dev/{DEVICE}/state"))
                                     if (s.get("update") or {}).get("in_progress")), None))
    assert state["update"]["in_progress"] == {"id": cmd, "version": "0.2.0", "phase": "queued"}


def test_switch_waits_for_a_priority_item_that_began_during_the_install(cabinet):
    cabinet["start"]()
    w = cabinet["watcher"]
    cmd = send_update(cabinet, "0.2.0")
    w.wait_ack(cmd, "started", timeout=30)
    play = cabinet["keys"].command(f"dev/{DEVICE}", "play", {
        "media": tone(cabinet, 20.0), "priority": "priority"})
    w.publish(f"ttcs/dev/{DEVICE}/cmd", play)
    w.wait_ack(play["id"], "started", timeout=20)
    played = w.wait_ack(play["id"], "done", timeout=60)
    assert played["stage"] == "done"  # not stopped by a restart
    offline = w.wait_for(lambda: next((s for s in w.json(f"dev/{DEVICE}/status")
                                       if s.get("reason") == "shutdown"), None), 60, "shutdown")
    assert offline["ts"] >= played["ts"]
    phases = {((s.get("update") or {}).get("in_progress") or {}).get("phase")
              for s in w.json(f"dev/{DEVICE}/state")}
    assert "ready" in phases  # installed before the item ended, and waited for it
    w.wait_ack(cmd, "done", timeout=60)

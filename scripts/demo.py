"""The demo behind scripts/demo: a broker, an agent on simulated hardware, a controller.

Everything runs in a temporary folder on free ports and is stopped at the end. With
``--console [HOST:PORT]`` it then leaves the district console (``ttcs-ctl serve``: relay and web
page) running on the demo's broker and device until Ctrl-C, with an ``admin`` login it prints.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEVICE = "krongpa-phutuc-c03"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def display(cmd: list[str]) -> str:
    """The command as a technician would type it: ttcs-agent / ttcs-ctl, no --config."""
    words = ["ttcs-ctl" if cmd[2] == "ctl" else "ttcs-agent"]
    rest = cmd[3:]
    i = 0
    while i < len(rest):
        if rest[i] == "--config":
            i += 2
            continue
        words.append(rest[i] if " " not in rest[i] else repr(rest[i]))
        i += 1
    return " ".join(words)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print(f"$ {display(cmd)}", flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    sys.stdout.write(out.stdout)
    sys.stdout.write(out.stderr)
    print(f"(exit {out.returncode})", flush=True)
    return out


def start_broker(folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = folder / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {folder / 'mosquitto.log'}\n{user}")
    mosquitto = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start; see " + str(folder / "mosquitto.log"))


def agent_config(folder: Path, port: int, kid: str, pub: str) -> Path:
    cfg = {
        "device": {"id": DEVICE, "groups": ["gialai", "krongpa", "phutuc"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_max_s": 5},
        "security": {"trusted_keys": {kid: pub}, "media_hosts": ["127.0.0.1"]},
        "paths": {"state_dir": str(folder / "state"), "cache_dir": str(folder / "cache")},
        # Real libvlc writing what the loudspeaker would air into a WAV file.
        "audio": {"backend": "vlc", "vlc_args": ["--aout=afile",
                                                 f"--audiofile-file={folder / 'aired.wav'}"]},
        "amplifier": {"warm_up_s": 0.5, "idle_hold_s": 5},
        "board": {"driver": "image", "width": 64, "height": 16,
                  "image_path": str(folder / "board.png"), "image_scale": 8},
        "gpio": {"backend": "sim"},
        "clock": {"trust": "always"},  # no NTP check in a demo
        "health": {"interval_s": 10},
        "state": {"min_interval_s": 0.5},
    }
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return path


def console(folder: Path, ctl_cfg: Path, listen: str, procs: list) -> None:
    """``ttcs-ctl serve`` on the demo's broker and device, until Ctrl-C."""
    import secrets

    cfg = yaml.safe_load(ctl_cfg.read_text())
    cfg["relay"] = {"db_path": str(folder / "relay.db"),
                    "groups": {"krongpa": ["krongpa-*"], "phutuc": ["krongpa-phutuc-*"]}}
    cfg["media"] = {"dir": str(folder / "console-media"), "base_url": f"http://{listen}/media"}
    cfg["locations"] = {DEVICE: [13.1935, 108.6880]}
    cfg["console"] = {"listen": listen}
    ctl_cfg.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    password = secrets.token_urlsafe(9)
    pw = folder / "admin.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    ctl = [PY, "-m", "ctl", "--config", str(ctl_cfg)]
    run([*ctl, "user", "add", "admin", "--role", "admin", "--password-file", str(pw)])
    log = open(folder / "serve.log", "wb")
    procs.append(subprocess.Popen([*ctl, "serve"], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT))
    print(f"\nThe district console: http://{listen}/  (user admin, password {password})")
    print(f"its log: {folder / 'serve.log'}; Ctrl-C stops everything")
    try:
        while procs[-1].poll() is None:
            time.sleep(0.5)
        print(f"ttcs-ctl serve exited; see {folder / 'serve.log'}")
    except KeyboardInterrupt:
        print()


def main() -> int:
    listen = None
    if "--console" in sys.argv:
        i = sys.argv.index("--console")
        listen = sys.argv[i + 1] if len(sys.argv) > i + 1 else "127.0.0.1:8080"
    folder = Path(tempfile.mkdtemp(prefix="ttcs-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        banner(f"1. A mosquitto broker (files in {folder})")
        broker, port = start_broker(folder)
        procs.append(broker)
        print(f"mosquitto listening on 127.0.0.1:{port}")

        # The district's media server (the agent downloads, verifies and caches what it airs).
        (folder / "media").mkdir()
        handler = functools.partial(QuietHandler, directory=str(folder / "media"))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        media_url = f"http://127.0.0.1:{server.server_port}"

        banner("2. The district controller makes its signing key")
        key = folder / "ctl" / "district.key"
        out = run([PY, "-m", "ctl", "keygen", "--out", str(key), "--kid", "district-ctl-1"])
        pub = out.stdout.strip().splitlines()[-1].split('"')[1]
        forger_key = folder / "ctl" / "forger.key"
        run([PY, "-m", "ctl", "keygen", "--out", str(forger_key), "--kid", "district-ctl-1"])

        banner("3. The cabinet's agent, on simulated hardware")
        cfg_path = agent_config(folder, port, "district-ctl-1", pub)
        run([PY, "-m", "agent", "check-config", "--config", str(cfg_path)])
        log = open(folder / "agent.log", "wb")
        agent = subprocess.Popen([PY, "-m", "agent", "run", "--config", str(cfg_path)],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs.append(agent)
        ctl_cfg = folder / "ctl.yaml"
        signing = {"kid": "district-ctl-1", "key_file": str(key)}
        ctl_cfg.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": port},
                                           "signing": signing}))
        forger_cfg = folder / "forger.yaml"
        forger_cfg.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": port},
                                              "signing": {"kid": "district-ctl-1",
                                                          "key_file": str(forger_key)}}))
        ctl = [PY, "-m", "ctl", "--config", str(ctl_cfg)]
        time.sleep(1.5)

        banner("4. A signed ping: received, then done")
        run([*ctl, "send", f"dev/{DEVICE}", "ping", "--timeout", "10"])

        banner("5. A forged command (signed with a key the cabinet does not trust): rejected")
        run([PY, "-m", "ctl", "--config", str(forger_cfg), "send", f"dev/{DEVICE}",
             "play", json.dumps({"media": {"url": "http://evil.example/x.mp3", "sha256": "0" * 64},
                                 "priority": "emergency"}), "--timeout", "10"])

        banner("6. An unsigned command: rejected")
        run([*ctl, "send", f"dev/{DEVICE}", "ping", "--unsigned", "--timeout", "10"])

        banner("7. Text-to-speech on the cabinet, then a board message")
        run([*ctl, "send", f"dev/{DEVICE}", "say",
             json.dumps({"text": "Thông báo: ngày mai tiêm phòng cho trẻ em tại trạm y tế xã.",
                         "priority": "priority"}, ensure_ascii=False), "--timeout", "60"])
        run([*ctl, "send", f"dev/{DEVICE}", "board",
             json.dumps({"text": "BÃO SỐ 3: người dân ở trong nhà", "priority": "emergency",
                         "duration_s": 5, "effect": "static"}, ensure_ascii=False),
             "--timeout", "20"])

        banner("8. Standing content: a commune schedule and the board's rotating messages")
        wav = folder / "media" / "bantin.wav"
        subprocess.run(["espeak-ng", "-v", "vi", "-w", str(wav),
                        "Bản tin sáng của xã Phú Túc"], check=True)
        import hashlib

        sha = hashlib.sha256(wav.read_bytes()).hexdigest()
        schedule = folder / "schedule.yaml"
        schedule.write_text(yaml.safe_dump({"items": [
            {"id": "ban-tin-sang", "media": {"url": f"{media_url}/bantin.wav", "sha256": sha},
             "days": ["mon", "tue", "wed", "thu", "fri", "sat"], "times": ["05:30"],
             "priority": "normal", "catch_up_s": 600},
            {"id": "ban-tin-chieu", "say": {"text": "Bản tin chiều của xã Phú Túc", "lang": "vi"},
             "days": ["mon", "tue", "wed", "thu", "fri", "sat"], "times": ["17:00"]},
        ]}, allow_unicode=True, sort_keys=False))
        run([*ctl, "schedule", "push", str(schedule), "--target", "grp/phutuc"])
        board_doc = folder / "board.yaml"
        board_doc.write_text(yaml.safe_dump({"rotate_s": 8, "messages": [
            {"id": "chao", "text": "UBND xã Phú Túc kính chào quý khách"},
            {"id": "tiem-chung", "text": "Tiêm chủng mở rộng: sáng thứ Bảy tại trạm y tế xã"},
        ]}, allow_unicode=True, sort_keys=False))
        run([*ctl, "board", "push", str(board_doc), "--target", f"dev/{DEVICE}"])
        time.sleep(1)

        banner("9. Ask for the state; the fleet table")
        run([*ctl, "send", f"dev/{DEVICE}", "state", "--timeout", "10"])
        run([*ctl, "watch", "--once", "2"])
        run([PY, "-m", "agent", "status", "--config", str(cfg_path)])

        if listen:
            banner("10. The district console, on this broker and device")
            console(folder, ctl_cfg, listen, procs)

        banner("11. Stop the agent cleanly (offline/shutdown)" if listen else
               "10. Stop the agent cleanly (offline/shutdown)")
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        aired = folder / "aired.wav"
        if aired.exists():
            print(f"what the loudspeaker aired: {aired} ({aired.stat().st_size} bytes)")
        board = folder / "board.png"
        if board.exists():
            print(f"what the LED board showed last: {board}")
        print(f"agent log: {folder / 'agent.log'}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())

"""``ttcs-agent doctor``: check the cabinet's parts and say how to fix each problem.

Each check prints one line ``ok``, ``WARN`` or ``FAIL`` with what it found, and for a problem a
``fix:`` line saying what to do. The exit status is 1 when anything FAILs. Checks are short
(a few seconds at most each), read-only, and safe to run beside a running agent: the modem is
then read from the agent's last health rather than asked over its port.
"""

from __future__ import annotations

import glob
import importlib.util
import ipaddress
import json
import os
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from agent import config
from agent.core.clock import kernel_clock_synchronised
from agent.pidfile import pid_alive
from agent.status import broker_line

NET_TIMEOUT_S = 3.0
MODEM_TIMEOUT_S = 3.0
LEVEL_WIDTH = 4

# what a technician does about a raised alert
ALERT_FIXES: dict[str, str] = {
    "audio_fault": "check the sound card is plugged in (`aplay -l`) and audio.device",
    "silent_output": "check the amplifier, speaker cables and the monitoring input",
    "amplifier_fault": "check the amplifier's power, fuse and fault LED",
    "board_link": "check the LED board's cable and power, and board.* settings",
    "disk_low": "free space: `du -sh` the state/cache dirs, lower media.quota_mb, or use a "
                "bigger SD card",
    "cpu_temp": "check the cabinet's ventilation, fan and heat sink",
    "mains_lost": "check the mains supply and breaker; the cabinet runs on battery",
    "door_open": "close the cabinet door and check the door switch",
    "clock_untrusted": "check NTP: `timedatectl status`; the network must reach an NTP server",
    "media_unavailable": "check the media host is reachable and listed in "
                         "security.media_hosts",
    "modem_signal": "check the antenna and its cable; move it higher or outside the cabinet",
}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "WARN" | "FAIL"
    name: str
    message: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.level:<{LEVEL_WIDTH}} {self.name}: {self.message}"]
        if self.fix and self.level != "ok":
            out.append(f"{'':<{LEVEL_WIDTH}}   fix: {self.fix}")
        return out


def ok(name: str, message: str) -> Finding:
    return Finding("ok", name, message)


def warn(name: str, message: str, fix: str) -> Finding:
    return Finding("WARN", name, message, fix)


def fail(name: str, message: str, fix: str) -> Finding:
    return Finding("FAIL", name, message, fix)


Check = Callable[[dict], list[Finding]]


def main(config_path: str | None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        cfg = config.load(config_path)
    except config.ConfigError as e:
        for p in e.problems:
            print(f"FAIL config: {p}", file=out)
        print(f"{'':<{LEVEL_WIDTH}}   fix: edit the file at the line shown, then run "
              "`ttcs-agent check-config`", file=out)
        return 1
    findings = run_checks(cfg)
    for f in findings:
        for line in f.lines():
            print(line, file=out)
    fails = sum(f.level == "FAIL" for f in findings)
    warns = sum(f.level == "WARN" for f in findings)
    print(f"{fails} problem(s), {warns} warning(s)", file=out)
    return 1 if fails else 0


def run_checks(cfg: dict) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        try:
            findings += check(cfg)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            findings.append(fail(check.__name__.removeprefix("check_"),
                                 f"the check itself failed: {type(e).__name__}: {e}",
                                 "report this as a bug, with the output above"))
    return findings


# --- config ----------------------------------------------------------------------------------

def check_config(cfg: dict) -> list[Finding]:
    """The file passed ``config.load`` (schema, cross-key and file rules); what is left are
    settings that are valid but probably not meant."""
    out: list[Finding] = []
    amp = cfg.get("amplifier") or {}
    if amp.get("fault_pin") is not None and (cfg.get("cabinet") or {}).get("amplifier_fault"):
        out.append(warn("config", "amplifier.fault_pin and cabinet.amplifier_fault are both "
                        "set; cabinet.amplifier_fault is ignored", "keep only one of them"))
    out.append(ok("config", f"{cfg.get('_path')} is valid (device {cfg['device']['id']})"))
    return out


# --- disk ------------------------------------------------------------------------------------

def check_disk(cfg: dict) -> list[Finding]:
    min_free = cfg["health"]["disk_min_free_mb"]
    return [_check_dir(name, cfg["paths"][key], min_free)
            for name, key in (("state", "state_dir"), ("cache", "cache_dir"))]


def _check_dir(name: str, path: str, min_free_mb: float) -> Finding:
    label = f"disk {name}"
    user = _user()
    if os.path.exists(path) and not os.path.isdir(path):
        return fail(label, f"{path} is not a folder", f"remove it or set paths.{name}_dir")
    probe = _nearest_existing(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".doctor-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return fail(label, f"{probe} is not writable by {user}: {e.strerror}",
                    f"sudo install -d -o {user} {path}")
    free = _free_mb(probe)
    if free is not None and free < min_free_mb:
        return fail(label, f"{path}: only {free} MB free (health.disk_min_free_mb is "
                    f"{min_free_mb:g})", ALERT_FIXES["disk_low"])
    created = "" if probe == path else f" (will be created in {probe})"
    return ok(label, f"{path} writable, {free} MB free{created}")


def _nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def _free_mb(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


# --- clock -----------------------------------------------------------------------------------

def clock_synchronised() -> bool | None:
    return kernel_clock_synchronised()


def check_clock(cfg: dict) -> list[Finding]:
    mode = cfg["clock"]["trust"]
    synced = clock_synchronised()
    ntp_fix = ("enable NTP (`sudo timedatectl set-ntp true`), check `timedatectl status` and "
               "that the network reaches an NTP server")
    if mode == "never":
        return [warn("clock", "clock.trust is never: scheduled items never air",
                     "set clock.trust: auto (or always on a board with a real-time clock)")]
    if synced:
        return [ok("clock", f"synchronised (clock.trust: {mode})")]
    state = "not synchronised" if synced is False else "synchronisation unknown"
    if mode == "always":
        return [warn("clock", f"{state}, but clock.trust is always: the time is believed",
                     "only right on a board with a real-time clock; otherwise " + ntp_fix)]
    if synced is None:
        return [warn("clock", f"{state} (adjtimex unavailable): scheduled items wait", ntp_fix)]
    return [fail("clock", f"{state}: scheduled items do not air until it is", ntp_fix)]


# --- broker ----------------------------------------------------------------------------------

def check_broker(cfg: dict) -> list[Finding]:
    m = cfg["mqtt"]
    name, where = "broker", f"{m['host']}:{m['port']}"
    out = _check_files(name, m.get("tls") or {}, m.get("password_file"))
    try:
        sock = socket.create_connection((m["host"], m["port"]), timeout=NET_TIMEOUT_S)
    except OSError as e:
        return [*out, fail(name, f"{where} unreachable: {e}",
                           "check mqtt.host/mqtt.port, the network (`ping`), the firewall and "
                           "that the broker runs")]
    with sock:
        if m.get("tls"):
            out.append(_tls_handshake(sock, m, where))
            if out[-1].level != "ok":
                return out
        else:
            out.append(ok(name, f"{where} reachable (TCP)"))
    if not m.get("tls") and not _is_loopback(m["host"]):
        out.append(warn("broker", "no TLS to a remote broker: traffic is readable on the way",
                        "set mqtt.tls (ca_file, cert_file, key_file)"))
    return [*out, _mqtt_versions(m, cfg["device"]["id"], where)]


def _mqtt_versions(m: dict, device: str, where: str) -> Finding:
    """Connect as the link would (not with the device's client id: that would drop the running
    agent's connection) and say which MQTT version the broker takes."""
    from agent.core.mqtt import probe

    found = probe(m, f"{device}-doctor-{os.getpid()}", NET_TIMEOUT_S)
    if found.protocol is None:
        return fail("broker", f"{where}: MQTT connection failed: {found.error}",
                    "check mqtt.username/password_file, the certificate and the broker's log "
                    "(it says why it refused or closed the connection)")
    if found.refused_5:
        return warn("broker", f"{where} does not accept MQTT 5 ({found.refused_5}); MQTT "
                    "3.1.1 works, and the agent falls back to it by itself",
                    "use a broker that speaks MQTT 5 (mosquitto 2): with 3.1.1 a command "
                    "published retained while the device was away cannot be refused; or set "
                    "mqtt.protocol: \"3.1.1\" to skip the attempt")
    return ok("broker", f"{where} accepts MQTT {found.protocol}")


def _check_files(name: str, tls: dict, password_file: str | None) -> list[Finding]:
    out = []
    files = {f"mqtt.tls.{k}": v for k, v in tls.items() if v}
    if password_file:
        files["mqtt.password_file"] = password_file
    for key, path in files.items():
        if not os.access(path, os.R_OK):
            out.append(fail(name, f"{key} {path} is missing or unreadable by {_user()}",
                            f"copy the file there or fix {key}"))
    return out


def _tls_handshake(sock: socket.socket, m: dict, where: str) -> Finding:
    tls = m["tls"]
    try:
        ctx = ssl.create_default_context(cafile=tls.get("ca_file") or None)
        if tls.get("cert_file"):
            ctx.load_cert_chain(tls["cert_file"], tls.get("key_file") or None)
        sock.settimeout(NET_TIMEOUT_S)
        with ctx.wrap_socket(sock, server_hostname=m["host"]) as tsock:
            version = tsock.version()
    except ssl.SSLCertVerificationError as e:
        return fail("broker", f"{where}: TLS certificate not trusted: {e.verify_message}",
                    "mqtt.tls.ca_file must be the CA that signed the broker's certificate, and "
                    "mqtt.host must be a name in it")
    except (ssl.SSLError, OSError, ValueError) as e:
        return fail("broker", f"{where}: TLS handshake failed: {e}",
                    "check the broker listens with TLS on this port and mqtt.tls files")
    return ok("broker", f"{where} reachable, TLS handshake ok ({version})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- audio -----------------------------------------------------------------------------------

def check_audio(cfg: dict) -> list[Finding]:
    a = cfg["audio"]
    if a["backend"] == "sim":
        return [warn("audio", "audio.backend is sim: nothing is heard",
                     "set audio.backend: vlc on a cabinet")]
    try:
        vlc = load_vlc()
        instance = vlc.Instance(["--no-video", "--quiet", *[str(x) for x in a["vlc_args"]]])
    except (ImportError, OSError, AttributeError, NameError) as e:
        return [fail("audio", f"libvlc unavailable: {e}",
                     "sudo apt install vlc-bin vlc-plugin-base; pip install python-vlc")]
    if instance is None:
        return [fail("audio", f"libvlc refused to start with audio.vlc_args {a['vlc_args']}",
                     "fix or remove audio.vlc_args")]
    instance.release()
    device = a.get("device")
    if device:
        from drivers.audio.vlc import alsa_card_present

        if not alsa_card_present(device):
            return [fail("audio", f"audio.device {device}: no such sound card",
                         "plug the USB sound card in; `aplay -l` lists the cards and their "
                         "names for audio.device")]
    return [ok("audio", f"libvlc starts; output {device or 'the system default'}")]


def load_vlc() -> Any:
    import vlc

    return vlc


# --- board -----------------------------------------------------------------------------------

def check_board(cfg: dict) -> list[Finding]:
    b = cfg["board"]
    driver = b["driver"]
    if driver == "none":
        return [ok("board", "no board configured")]
    if driver == "image":
        path = b.get("image_path") or os.path.join(cfg["paths"]["state_dir"], "board.png")
        folder = _nearest_existing(os.path.dirname(os.path.abspath(path)))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            return [fail("board", f"image: {folder} is not a writable folder",
                         "fix board.image_path")]
        return [ok("board", f"image driver writes {path}")]
    if driver == "serial":
        port = b.get("serial_port")
        if not port:
            return [fail("board", "board.serial_port is not set", "set it to the sign's port")]
        if not os.path.exists(port):
            return [fail("board", f"serial sign port {port} missing",
                         "plug the sign's USB-serial adapter in (`ls /dev/ttyUSB*`) and set "
                         "board.serial_port")]
        return [ok("board", f"serial sign port {port} present")]
    if driver == "framebuffer":
        return _check_framebuffer(b["framebuffer"])
    return _check_max7219(b)


def _check_framebuffer(fb: dict) -> list[Finding]:
    """The screen's geometry, the region inside it, the device writable by this user."""
    from drivers.board.base import BoardLinkError
    from drivers.board.framebuffer import check_region, read_geometry

    hdmi = ("use Raspberry Pi OS with the KMS driver and a fixed HDMI mode (docs/DEPLOY.md, "
            "\"HDMI screens\")")
    try:
        g = read_geometry(fb["sysfs"])
        x, y, w, h = check_region(fb["region"], g)
    except (BoardLinkError, ValueError) as e:
        return [fail("board", f"framebuffer: {e}", f"{hdmi}; check board.framebuffer")]
    if not os.access(fb["device"], os.R_OK | os.W_OK):
        return [fail("board", f"framebuffer: {fb['device']} missing or not writable",
                     f"{hdmi}; the agent's user must be in the group video")]
    return [ok("board", f"framebuffer {fb['device']}: {g.width}x{g.height} at {g.bpp} bpp, "
                        f"pages of {w}x{h} at ({x}, {y})")]


def _check_max7219(b: dict) -> list[Finding]:
    # spi: false drives a no-op transport (the driver needs no spidev then)
    needed = ("luma.led_matrix", "spidev") if b["spi"] else ("luma.led_matrix",)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return [fail("board", f"max7219: {', '.join(missing)} not installed",
                     f"pip install {' '.join(m.replace('_', '-') for m in missing)}")]
    if not b["spi"]:
        return [warn("board", "max7219 with board.spi: false: frames go nowhere (no-op "
                     "transport)", "set board.spi: true on a cabinet with the LED board")]
    dev = f"/dev/spidev{b['spi_port']}.{b['spi_device']}"
    if not os.path.exists(dev):
        return [fail("board", f"max7219: {dev} missing",
                     "enable SPI (`sudo raspi-config nonint do_spi 0`, then reboot) and check "
                     "board.spi_port/spi_device")]
    return [ok("board", f"max7219 on {dev}")]


# --- gpio ------------------------------------------------------------------------------------

def check_gpio(cfg: dict) -> list[Finding]:
    if cfg["gpio"]["backend"] == "sim":
        return [warn("gpio", "gpio.backend is sim: the amplifier relay and cabinet inputs are "
                     "simulated", "set gpio.backend: lgpio on a cabinet")]
    if importlib.util.find_spec("RPi") is None:
        return [fail("gpio", "RPi.GPIO (rpi-lgpio) is not installed",
                     "sudo apt install python3-rpi-lgpio (or pip install rpi-lgpio)")]
    chips = glob.glob("/dev/gpiochip*")
    if not chips:
        return [fail("gpio", "no /dev/gpiochip*: not a Raspberry Pi, or GPIO disabled",
                     "run on the cabinet's board, or set gpio.backend: sim")]
    if not all(os.access(c, os.R_OK | os.W_OK) for c in chips):
        return [fail("gpio", f"{chips[0]} not accessible by {_user()}",
                     f"sudo usermod -aG gpio {_user()}, then log in again")]
    return [ok("gpio", f"lgpio on {', '.join(sorted(chips))}")]


# --- modem -----------------------------------------------------------------------------------

def check_modem(cfg: dict) -> list[Finding]:
    m = cfg["modem"]
    if m["backend"] == "sim":
        return [warn("modem", "modem.backend is sim: the modem is simulated",
                     "set modem.backend: at (or leave it out) on a cabinet")]
    if not m.get("port"):
        return [ok("modem", "none configured")]
    status = read_agent_status(cfg)
    if status is not None and status["alive"]:
        return [_modem_from_health(cfg, m["port"])]
    from drivers import DriverUnavailable, resolve
    from drivers.modem.base import ModemError, ModemPortError

    try:
        with resolve("modem", m["backend"])(m["port"], baudrate=m["baudrate"],
                                            timeout=min(m["timeout_s"], MODEM_TIMEOUT_S)) as modem:
            result = modem.query()
    except DriverUnavailable as e:
        return [fail("modem", str(e), "pip install pyserial (or apt install python3-serial)")]
    except ModemPortError as e:
        return [fail("modem", str(e), "check the modem is plugged in (`ls /dev/ttyUSB*`, "
                     "`dmesg | tail`) and that modem.port is its AT port")]
    except ModemError as e:
        return [fail("modem", f"{m['port']} does not answer AT: {e}",
                     "modem.port may be the wrong interface (try the next ttyUSB), or the "
                     "modem is booting; power-cycle it")]
    return [_modem_finding(result, m["port"], "")]


def _modem_from_health(cfg: dict, port: str) -> Finding:
    h = read_last_health(cfg) or {}
    if not isinstance(h.get("modem"), dict):
        return fail("modem", f"{port}: the running agent gets no answer "
                    f"({h.get('modem_error') or 'no sample yet'})",
                    "check the modem is plugged in and modem.port is its AT port")
    return _modem_finding(h["modem"], port, " (from the running agent)")


def _modem_finding(result: dict, port: str, source: str) -> Finding:
    text = (f"{port}: {result.get('signal_dbm')} dBm, {result.get('operator') or 'no operator'}"
            f" {result.get('tech') or ''}, {result.get('registration')}{source}")
    if not result.get("registered"):
        return warn("modem", text, "check the SIM card (PIN off, data plan active) and antenna")
    dbm = result.get("signal_dbm")
    if isinstance(dbm, int) and dbm < -105:
        return warn("modem", text, ALERT_FIXES["modem_signal"])
    return ok("modem", text)


# --- the running agent -----------------------------------------------------------------------

def check_update(cfg: dict) -> list[Finding]:
    """Installed versions and updates over the air (docs/UPDATE.md)."""
    from agent.update.layout import Layout

    u = Layout(cfg["update"]["prefix"]).describe()
    if u["running"] is None:
        # A development checkout, not a cabinet: nothing to warn about.
        return [ok("update", f"no versions under {cfg['update']['prefix']}/venvs (not "
                   "installed by scripts/install): updates over the air are refused")]
    text = f"running {u['running']}, previous {u['previous'] or 'none'}"
    cur, last = u["in_progress"], u.get("last") or {}
    if cur:
        return [warn("update", f"{text}; update to {cur['version']} in progress "
                     f"({cur['phase']})", "wait for its final ack (probation)")]
    if last.get("state") == "rolled_back":
        return [warn("update", f"{text}; the update to {last['version']} was rolled back: "
                     f"{last['why']}", "see journalctl -u ttcs-agent for the failed starts")]
    return [ok("update", text)]


def read_agent_status(cfg: dict) -> dict | None:
    """status.json of the agent with ``alive`` added; None when it never ran here."""
    path = os.path.join(cfg["paths"]["state_dir"], "status.json")
    try:
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict):
        return None
    return {**st, "alive": pid_alive(st.get("pid")) and st.get("running", True) is not False}


def read_last_health(cfg: dict) -> dict | None:
    try:
        with open(os.path.join(cfg["paths"]["state_dir"], "health.json"), encoding="utf-8") as f:
            h = json.load(f)
    except (OSError, ValueError):
        return None
    return h if isinstance(h, dict) else None


def check_agent(cfg: dict) -> list[Finding]:
    st = read_agent_status(cfg)
    start = "sudo systemctl start ttcs-agent; `journalctl -u ttcs-agent` says why it stopped"
    if st is None:
        return [warn("agent", "has never run with this config", start)]
    if not st["alive"]:
        return [warn("agent", f"not running (last pid {st.get('pid')})", start)]
    mqtt = st.get("mqtt") or {}
    running = f"running, pid {st.get('pid')}, broker {broker_line(mqtt)}, " \
              f"{mqtt.get('outbox', 0)} message(s) waiting"
    if not mqtt.get("connected"):
        out = [fail("agent", running, "see the broker line above; `journalctl -u ttcs-agent` "
                    "shows each attempt")]
    elif mqtt.get("fallback"):
        out = [warn("agent", running, "use a broker that speaks MQTT 5, or set mqtt.protocol: "
                    "\"3.1.1\" (docs/DEPLOY.md, brokers)")]
    else:
        out = [ok("agent", running)]
    for alert in ((st.get("state") or {}).get("alerts")) or []:
        if isinstance(alert, dict):
            key = f"[{alert['key']}]" if alert.get("key") else ""
            out.append(warn("alert", f"{alert.get('code')}{key} raised "
                            f"{json.dumps(alert.get('detail') or {}, ensure_ascii=False)}",
                            ALERT_FIXES.get(str(alert.get("code")), "see docs/HEALTH.md")))
    return out


CHECKS: tuple[Check, ...] = (check_config, check_disk, check_clock, check_broker, check_audio,
                             check_board, check_gpio, check_modem, check_agent)
CHECKS += (check_update,)  # docs/UPDATE.md

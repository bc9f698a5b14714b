"""ttcs-agent doctor: each check finds its problem and says what to do; exit 1 on any FAIL."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import doctor
from tests.conftest import ROOT, agent_config, free_port
from tests.test_modem import HEALTHY, FakeModem


@pytest.fixture(autouse=True)
def synced_clock(monkeypatch):
    monkeypatch.setattr(doctor, "clock_synchronised", lambda: True)


def run(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = doctor.main(str(path), out)
    return code, out.getvalue()


def lines(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln[5:].startswith(f"{name}:")]


def test_sim_cabinet_with_a_broker_passes_with_warnings(broker, keys, tmp_path):
    code, text = run(agent_config(tmp_path, broker.port, keys))
    assert code == 0, text
    assert lines(text, "config")[0].startswith("ok   config:")
    assert lines(text, "broker") == [f"ok   broker: 127.0.0.1:{broker.port} reachable (TCP)",
                                     f"ok   broker: 127.0.0.1:{broker.port} accepts MQTT 5"]
    assert lines(text, "audio")[0].startswith("WARN audio: audio.backend is sim")
    assert lines(text, "gpio")[0].startswith("WARN gpio: gpio.backend is sim")
    assert [ln[:4] for ln in lines(text, "disk state") + lines(text, "disk cache")] == ["ok  "] * 2
    assert "fix: set audio.backend: vlc on a cabinet" in text
    assert text.rstrip().endswith("0 problem(s), 3 warning(s)")  # audio, gpio, agent not run


def test_unreachable_broker_fails_with_its_fix(keys, tmp_path):
    code, text = run(agent_config(tmp_path, free_port(), keys))
    assert code == 1
    [line] = lines(text, "broker")
    assert line.startswith("FAIL broker:") and "unreachable" in line
    assert "fix: check mqtt.host/mqtt.port" in text


def test_tls_configured_against_a_plain_listener_fails_the_handshake(broker, keys, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(_make_ca(tmp_path / "ca")[0])
    code, text = run(agent_config(tmp_path, broker.port, keys, mqtt={"tls": {"ca_file": str(ca)}}))
    assert code == 1
    assert any(ln.startswith("FAIL broker:") and "TLS" in ln for ln in lines(text, "broker"))


def test_a_ca_file_that_is_no_certificate_is_a_config_problem(broker, keys, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    code, text = run(agent_config(tmp_path, broker.port, keys, mqtt={"tls": {"ca_file": str(ca)}}))
    assert code == 1
    assert f"mqtt.tls.ca_file: {ca}: no PEM CA certificate in it" in text


def test_tls_handshake_against_a_tls_listener(tmp_path, keys):
    """A real TLS server (Python's ssl) with a self-made CA: ok with the CA, FAIL without."""
    pytest.importorskip("cryptography")
    ca_file, server = _tls_server(tmp_path)
    try:
        good = agent_config(tmp_path, server.port, keys, device="good",
                            mqtt={"host": "localhost", "tls": {"ca_file": str(ca_file)}})
        code, text = run(good)
        assert lines(text, "broker")[0].startswith("ok   broker:"), text
        assert "TLS handshake ok" in text
        other = tmp_path / "other-ca.pem"
        other.write_bytes(_make_ca(tmp_path / "other")[0])
        bad = agent_config(tmp_path, server.port, keys, device="bad",
                           mqtt={"host": "localhost", "tls": {"ca_file": str(other)}})
        code, text = run(bad)
        assert code == 1 and "TLS certificate not trusted" in text
    finally:
        server.stop()


def test_state_dir_problems_and_low_disk(broker, keys, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cfg = agent_config(tmp_path, broker.port, keys, paths={"state_dir": str(blocker)},
                       health={"disk_min_free_mb": 10_000_000})
    code, text = run(cfg)
    assert code == 1
    assert lines(text, "disk state")[0].startswith(f"FAIL disk state: {blocker} is not a folder")
    [cache] = lines(text, "disk cache")
    assert cache.startswith("FAIL disk cache:") and "MB free (health.disk_min_free_mb" in cache


def test_config_errors_and_cross_field_rules(broker, keys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device:\n  id: Bad Id\nbogus: 1\n")
    code, text = run(bad)
    assert code == 1 and "FAIL config:" in text and "bogus: unknown key" in text
    cfg = agent_config(tmp_path, broker.port, keys,
                       cabinet={"door": {"pin": 5}, "mains": {"pin": 5}},
                       alerts={"cpu_temp": {"raise_c": 70, "clear_c": 75}})
    code, text = run(cfg)
    assert code == 1
    problems = lines(text, "config")
    assert any("cpu_temp.clear_c: must be below" in ln for ln in problems)
    assert any("BCM 5 is already used" in ln for ln in problems)


def test_clock_unsynchronised_fails_only_when_the_agent_waits_for_it(broker, keys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(doctor, "clock_synchronised", lambda: False)
    code, text = run(agent_config(tmp_path, broker.port, keys, clock={"trust": "auto"},
                                  device="auto"))
    assert code == 1 and lines(text, "clock")[0].startswith("FAIL clock: not synchronised")
    code, text = run(agent_config(tmp_path, broker.port, keys, device="always"))
    assert code == 0 and lines(text, "clock")[0].startswith("WARN clock:")


def test_audio_vlc_missing_library_and_missing_card(broker, keys, tmp_path, monkeypatch):
    def no_vlc():
        raise ImportError("libvlc.so.5: cannot open shared object file")

    monkeypatch.setattr(doctor, "load_vlc", no_vlc)
    code, text = run(agent_config(tmp_path, broker.port, keys, audio={"backend": "vlc"},
                                  device="novlc"))
    assert code == 1 and "FAIL audio: libvlc unavailable" in text and "apt install" in text
    monkeypatch.undo()
    monkeypatch.setattr(doctor, "clock_synchronised", lambda: True)
    if not _vlc_works():
        pytest.skip("libvlc cannot start here")
    code, text = run(agent_config(tmp_path, broker.port, keys, device="nocard",
                                  audio={"backend": "vlc", "device": "plughw:CARD=Nope,DEV=0"}))
    assert "FAIL audio: audio.device plughw:CARD=Nope,DEV=0: no such sound card" in text


def test_board_checks(broker, keys, tmp_path):
    code, text = run(agent_config(tmp_path, broker.port, keys, device="serial",
                                  board={"driver": "serial", "serial_port": "/dev/ttyNOPE9"}))
    assert code == 1 and "FAIL board: serial sign port /dev/ttyNOPE9 missing" in text
    code, text = run(agent_config(tmp_path, broker.port, keys, device="image",
                                  board={"driver": "image",
                                         "image_path": str(tmp_path / "b" / "board.png")}))
    assert lines(text, "board")[0].startswith("ok   board: image driver writes")


def test_max7219_without_spi_does_not_need_spidev(broker, keys, tmp_path, monkeypatch):
    """``spi: false`` drives a no-op transport; doctor failed it for a missing spidev."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "spidev" else real(name, *a))
    _, text = run(agent_config(tmp_path, broker.port, keys, device="nospi",
                               board={"driver": "max7219", "spi": False}))
    [line] = lines(text, "board")
    assert line.startswith("WARN board: max7219 with board.spi: false"), text
    code, text = run(agent_config(tmp_path, broker.port, keys, device="spi",
                                  board={"driver": "max7219", "spi": True}))
    assert code == 1
    assert "FAIL board: max7219: spidev not installed" in text and "pip install spidev" in text


def test_modem_answering_on_a_pty_and_a_missing_port(broker, keys, tmp_path):
    fake = FakeModem(HEALTHY)
    try:
        code, text = run(agent_config(tmp_path, broker.port, keys, device="modem",
                                      modem={"port": fake.path, "timeout_s": 2}))
    finally:
        fake.stop()
    [line] = lines(text, "modem")
    assert line.startswith("ok   modem:") and "-79 dBm, Viettel LTE, home" in line
    code, text = run(agent_config(tmp_path, broker.port, keys, device="nomodem",
                                  modem={"port": str(tmp_path / "ttyUSB9")}))
    assert code == 1 and lines(text, "modem")[0].startswith("FAIL modem: cannot open")
    code, text = run(agent_config(tmp_path, broker.port, keys, device="simmodem",
                                  modem={"backend": "sim"}))
    assert lines(text, "modem") == ["WARN modem: modem.backend is sim: the modem is simulated"]


def test_running_agent_its_alerts_and_its_modem(broker, keys, tmp_path):
    cfg = agent_config(tmp_path, broker.port, keys, modem={"port": "/dev/ttyUSB2"})
    state = tmp_path / "krongpa-phutuc-c03" / "state"
    state.mkdir(parents=True)
    (state / "status.json").write_text(json.dumps({
        "pid": os.getpid(), "running": True,
        "mqtt": {"connected": False, "last_error": "connection refused", "outbox": 7},
        "state": {"alerts": [{"code": "door_open", "since": 1, "detail": {"pin": 17}}]}}))
    (state / "health.json").write_text(json.dumps({"modem": None, "modem_error": "timeout"}))
    code, text = run(cfg)
    assert code == 1  # the modem FAILs, and an agent that is not connected; an alert WARNs
    assert "FAIL agent: running" in text and "DISCONNECTED: connection refused" in text
    assert "WARN alert: door_open raised" in text and "close the cabinet door" in text
    assert "FAIL modem: /dev/ttyUSB2: the running agent gets no answer (timeout)" in text
    (state / "status.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    _, text = run(cfg)
    assert lines(text, "agent")[0].startswith("WARN agent: not running")


def test_doctor_command_line(broker, keys, tmp_path):
    cfg = agent_config(tmp_path, broker.port, keys)
    out = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "ok   config:" in out.stdout and "problem(s)" in out.stdout
    assert out.returncode in (0, 1)  # the clock of the machine running the tests decides


# --- helpers ------------------------------------------------------------------------------------

def _vlc_works() -> bool:
    try:
        vlc = doctor.load_vlc()
        inst = vlc.Instance(["--no-video", "--quiet"])
    except Exception:
        return False
    if inst is None:
        return False
    inst.release()
    return True


def _make_ca(folder: Path) -> tuple[bytes, object, object]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test ca {folder.name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), cert, key


class _TlsServer:
    def __init__(self, context, sock: socket.socket) -> None:
        import threading

        self.sock = sock
        self.port = sock.getsockname()[1]
        self.context = context
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import ssl

        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def _tls_server(tmp_path: Path) -> tuple[Path, _TlsServer]:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_pem, ca_cert, ca_key = _make_ca(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return ca_file, _TlsServer(ctx, sock)

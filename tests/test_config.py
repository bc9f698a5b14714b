"""Config validation: positions, unknown keys, ranges, defaults, the check-config command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import config
from tests.conftest import ROOT

GOOD = """\
device:
  id: krongpa-phutuc-c03
  groups: [gialai, krongpa, phutuc]
mqtt:
  host: 127.0.0.1
  port: 1883
"""


def problems(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "agent.yaml")
    return e.value.problems


def test_defaults_fill_in():
    cfg = config.parse(GOOD)
    assert cfg["security"]["require_signed"] is True
    assert cfg["security"]["max_skew_s"] == 300
    assert cfg["device"]["timezone"] == "Asia/Ho_Chi_Minh"
    assert cfg["device"]["languages"] == ["vi"]
    assert cfg["health"]["interval_s"] == 60
    assert cfg["board"]["image_path"] == "/var/lib/ttcs-agent/board.png"


def test_every_problem_with_line_and_column():
    text = GOOD.replace("  port: 1883", "  port: 70000\n  hots: x") + "audio:\n  backend: vlcc\n"
    got = problems(text)
    assert got == [
        "agent.yaml:6:3: mqtt.port: must be at most 65535, not 70000",
        "agent.yaml:7:3: mqtt.hots: unknown key (did you mean 'host'?)",
        "agent.yaml:9:3: audio.backend: must be one of vlc, sim, not 'vlcc' (did you mean 'vlc'?)",
    ]


def test_missing_required_points_at_parent_and_types_are_named():
    got = problems("device:\n  groups: krongpa\nsecurity:\n  require_signed: yes please\n")
    assert "agent.yaml:1:1: device.id: is required" in got
    assert "agent.yaml:2:3: device.groups: must be a list, not a string" in got
    assert "agent.yaml:4:3: security.require_signed: must be true or false, not a string" in got


def test_bad_keys_timezone_duplicates_and_yaml_syntax():
    got = problems(GOOD + "  host: 10.0.0.1\nsecurity:\n  trusted_keys:\n    k1: notbase64\n"
                   "device2: {}\n")
    assert any(p.startswith("agent.yaml:7:3: mqtt.host: duplicate key") for p in got)
    assert any("security.trusted_keys.k1: must be a raw 32-byte Ed25519" in p for p in got)
    assert any("device2: unknown key (did you mean 'device'?)" in p for p in got)
    assert problems(GOOD.replace("  id: krongpa-phutuc-c03", "  id: ok\n  timezone: Asia/Ho_Chi_Mihn"))[0] \
        .endswith("unknown time zone 'Asia/Ho_Chi_Mihn' (did you mean 'Asia/Ho_Chi_Minh'?)")
    got = problems("device: [unclosed\n")
    assert got[0].startswith("agent.yaml:2:1: (yaml):")


def test_check_config_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "helth:\n  interval_s: 1\n")
    ok = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(good)],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(bad)],
                        cwd=ROOT, capture_output=True, text=True)
    assert ko.returncode == 1
    assert f"{bad}:7:1: helth: unknown key (did you mean 'health'?)" in ko.stdout
    missing = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config",
                              str(tmp_path / "nope.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "not found" in missing.stdout


def test_example_config_is_valid():
    cfg = config.load(str(ROOT / "config" / "agent.example.yaml"))
    assert cfg["device"]["id"]


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
yaml_trees = st.recursive(yaml_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(["device", "id", "mqtt", "port", "groups", "security", "board", "x", "audio",
                     "trusted_keys", "health", "interval_s"]), c, max_size=4), max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(tree=yaml_trees, noise=st.text(max_size=40))
def test_fuzzed_config_files_give_problems_not_exceptions(tree, noise):
    import yaml

    for text in (yaml.safe_dump(tree), noise, GOOD + noise):
        try:
            config.parse(text, "f.yaml")
        except config.ConfigError as e:
            assert e.problems and all(p.startswith("f.yaml:") for p in e.problems)


def test_cross_key_rules_are_checked_before_start():
    got = problems(GOOD + "alerts:\n  cpu_temp: {raise_c: 70, clear_c: 75}\n"
                   "amplifier: {pin: 17}\ncabinet:\n  door: {pin: 17}\n  mains: {pin: 17}\n")
    assert "agent.yaml:8:27: alerts.cpu_temp.clear_c: must be below alerts.cpu_temp.raise_c (70)" in got
    assert "agent.yaml:9:13: amplifier.pin: BCM 17 is already used by cabinet.door" in got
    assert any(p.startswith("agent.yaml:12:11: cabinet.mains.pin: BCM 17 is already used") for p in got)


def test_example_config_shows_every_key():
    import yaml

    example = yaml.safe_load((ROOT / "config" / "agent.example.yaml").read_text())
    missing: list[str] = []

    def walk(section, node, path=""):
        for key, spec in section.fields.items():
            sub = f"{path}.{key}" if path else key
            if not isinstance(node, dict) or key not in node:
                missing.append(sub)
            elif isinstance(spec, config.Section) and not spec.sparse and isinstance(node[key], dict):
                walk(spec, node[key], sub)

    walk(config.SCHEMA, example)
    assert missing == [], f"config/agent.example.yaml does not document {missing}"


def test_live_probe_bounds_must_be_ordered():
    got = problems(GOOD + "audio:\n  live: {probe_min_s: 300, probe_max_s: 60}\n")
    assert any(p.endswith("audio.live.probe_min_s: 300 is more than probe_max_s (60)")
               for p in got), got


# --- limits on a hostile file (issue 15) ----------------------------------------------------

def _alias_bomb(levels: int = 9) -> str:
    lines = ['x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return GOOD + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_without_the_memory():
    """Nine lines expanding to 9^9 values: positions and the schema walked every one of them
    (gigabytes, minutes), in check-config and in a SIGHUP reload on the core thread."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    got = problems(_alias_bomb())
    assert time.monotonic() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    assert len(got) == 1 and "(yaml): more than 50000 values (aliases counted each time" in got[0]


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 5000 + "]" * 5000, "nested more than 64 levels deep"),
    ("a: &a [1, *a]\n", "an alias refers to a node that contains it"),
    ("a: &a {b: [*a]}\n", "an alias refers to a node that contains it"),
    ("a: [" + ",".join(["0"] * 60_000) + "]\n", "more than 50000 values"),
])
def test_deep_recursive_and_huge_documents_are_problems_not_tracebacks(text, message):
    [got] = problems(text)
    assert got.startswith("agent.yaml:1:") and message in got


def test_aliases_within_the_limits_still_work():
    cfg = config.parse(GOOD + "health: &h {interval_s: 30}\nstate: {min_interval_s: 2}\n"
                       "log: {level: &lvl debug}\n")
    assert cfg["health"]["interval_s"] == 30 and cfg["log"]["level"] == "debug"


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "#" * (config.MAX_FILE_BYTES + 10) + "\n")
    with pytest.raises(config.ConfigError) as e:
        config.load_file(str(big))
    assert e.value.problems == [f"{big}:1:1: (file): larger than 1024 KiB"]


def test_check_config_refuses_a_bomb_quickly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    out = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(bomb)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "more than 50000 values" in out.stdout


# --- files and hardware rules, all in one pass (issue 15) ---------------------------------

def _pem_pair(folder):
    from cryptography.hazmat.primitives import serialization

    from tests.test_doctor import _make_ca

    pem, _cert, key = _make_ca(folder)
    cert_file, key_file = folder / "dev.crt", folder / "dev.key"
    cert_file.write_bytes(pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def _tls(ca, cert=None, key=None) -> str:
    return GOOD + f"  tls: {{ca_file: {ca}, cert_file: {cert or 'null'}, key_file: {key or 'null'}}}\n"


def test_tls_files_must_exist_be_pem_and_belong_together(tmp_path):
    cert, key = _pem_pair(tmp_path / "a")
    _, other_key = _pem_pair(tmp_path / "b")
    assert config.parse(_tls(cert, cert, key))["mqtt"]["tls"]["ca_file"] == str(cert)
    [got] = problems(_tls(tmp_path / "nope.crt", cert, key))
    assert got == f"agent.yaml:7:9: mqtt.tls.ca_file: {tmp_path / 'nope.crt'} not found"
    [got] = problems(_tls(cert, tmp_path / "nope.crt", key))
    assert got.endswith(f"mqtt.tls.cert_file: {tmp_path / 'nope.crt'} not found")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    [got] = problems(_tls(garbage))
    assert got.endswith(f"mqtt.tls.ca_file: {garbage}: no PEM CA certificate in it "
                        "(NO_CERTIFICATE_OR_CRL_FOUND)")
    [got] = problems(_tls(cert, cert, other_key))
    assert f"mqtt.tls.cert_file: {cert}: not a PEM certificate matching the key {other_key}" in got
    [got] = problems(_tls(cert, None, key))
    assert got.endswith("mqtt.tls.key_file: is set without mqtt.tls.cert_file (the certificate "
                        "it belongs to)")


def test_run_with_a_missing_ca_file_names_it_instead_of_a_traceback(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(_tls(tmp_path / "missing-ca.crt") + f"paths: {{state_dir: {tmp_path}/s, "
                    f"cache_dir: {tmp_path}/c}}\n")
    out = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"mqtt.tls.ca_file: {tmp_path / 'missing-ca.crt'} not found" in out.stderr


def test_board_font_must_load(tmp_path):
    [got] = problems(GOOD + f"board: {{font: {tmp_path}/none.ttf}}\n")
    assert got == f"agent.yaml:7:9: board.font: {tmp_path}/none.ttf not found"
    not_font = tmp_path / "font.ttf"
    not_font.write_text("hello")
    [got] = problems(GOOD + f"board: {{font: {not_font}}}\n")
    assert f"board.font: {not_font} cannot be loaded as a TrueType/OpenType font" in got


@pytest.mark.parametrize("board, message", [
    ("{driver: max7219, width: 64, height: 16, cascaded: 4}",
     "board.cascaded: 4 modules make a 32x8 display (luma chains them in one row of 8x8 "
     "modules), but board.width x height is 64x16: leave cascaded null, or set width 32 and "
     "height 8"),
    ("{driver: none, width: 64, height: 16, cascaded: 16}", "board.cascaded: 16 modules make "
     "a 128x8 display"),
    ("{driver: max7219, width: 60, height: 16}", "board.width: a max7219 board is made of 8x8 "
     "modules: width and height must be multiples of 8, not 60x16"),
    ("{driver: max7219, block_orientation: 45}", "board.block_orientation: must be one of 0, "
     "90, -90, 180, not 45"),
    ("{driver: max7219, spi_speed_hz: 3000000}", "board.spi_speed_hz: must be one of 500000, "
     "1000000, 2000000, 4000000, 8000000, not 3000000"),
    ("{driver: max7219, width: 64, height: 16, rotate: 1}", "board.rotate: 1 turns the 64x16 "
     "board into a 16x64 display"),
])
def test_max7219_geometry_luma_cannot_drive_is_refused(board, message):
    [got] = problems(GOOD + f"board: {board}\n")
    assert message in got


def test_max7219_geometry_that_works_passes():
    for board in ("{driver: max7219, width: 32, height: 8, cascaded: 4}",
                  "{driver: max7219, width: 64, height: 16}",
                  "{driver: max7219, width: 8, height: 32, cascaded: 4, rotate: 1}",
                  "{driver: max7219, width: 16, height: 16, rotate: 3}"):
        config.parse(GOOD + f"board: {board}\n")


def test_schema_and_file_problems_come_in_one_pass(tmp_path):
    """File checks used to run only once the schema errors were fixed: a second round."""
    text = (_tls(tmp_path / "nope.crt") + "  port: 70000\n  hots: x\n"
            f"board: {{font: {tmp_path}/none.ttf, width: banana}}\n")
    got = problems(text)
    assert any("mqtt.port: must be at most 65535" in p for p in got)
    assert any("mqtt.hots: unknown key" in p for p in got)
    assert any("board.width: must be an integer" in p for p in got)
    assert any(f"mqtt.tls.ca_file: {tmp_path / 'nope.crt'} not found" in p for p in got)
    assert any(f"board.font: {tmp_path}/none.ttf not found" in p for p in got)


@pytest.mark.parametrize("zone, hint", [
    ("GMT+7", "(did you mean 'Asia/Ho_Chi_Minh'? Viet Nam is UTC+7; the fixed-offset name is "
              "'Etc/GMT-7': POSIX zone names invert the sign)"),
    ("UTC+07:00", "did you mean 'Asia/Ho_Chi_Minh'?"),
    ("+7", "did you mean 'Asia/Ho_Chi_Minh'?"),
    ("UTC-5", "the fixed UTC-5 is 'Etc/GMT+5': POSIX zone names invert the sign"),
    ("GMT+5:30", "(use a place name such as 'Asia/Ho_Chi_Minh')"),
    ("UTC+0", "(did you mean 'UTC'?)"),
    ("Asia/Hanoi", "(did you mean 'Asia/Ho_Chi_Minh'?)"),
    ("ICT", "(did you mean 'Asia/Ho_Chi_Minh'?)"),
    ("Asia/Ho_Chi_Mihn", "(did you mean 'Asia/Ho_Chi_Minh'?)"),
])
def test_time_zone_hints_for_offsets_and_local_names(zone, hint):
    """``GMT+7`` used to get "did you mean 'GMT+0'?"."""
    [got] = problems(GOOD.replace("  groups:", f"  timezone: '{zone}'\n  groups:"))
    assert f"device.timezone: unknown time zone {zone!r} (" in got and hint in got


def test_a_bad_ca_file_does_not_hide_a_bad_cert_file(tmp_path):
    got = problems(_tls(tmp_path / "no-ca.crt", tmp_path / "no-cert.crt"))
    assert [p.split(": ", 1)[1] for p in got] == [
        f"mqtt.tls.ca_file: {tmp_path / 'no-ca.crt'} not found",
        f"mqtt.tls.cert_file: {tmp_path / 'no-cert.crt'} not found"]

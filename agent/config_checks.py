"""Rules of the agent's config that the schema cannot express: across keys, and about files.

They run in the same pass as the schema (``agent.config.parse``), so ``check-config`` reports
every problem at once: each rule names the keys it reads and is skipped only when one of those
keys already has a schema problem (a wrong type would make the rule's own message a guess).
A rule returns ``(key.path, what is wrong)`` pairs; the config gives them their file positions.

What they refuse is what would otherwise stop or break the agent after it started: a TLS file
that is missing or not PEM (``run`` crashed with a traceback naming no file), a board font that
cannot be loaded (``board-preview`` crashed), a MAX7219 geometry that luma cannot drive (the
board reconnected every few seconds with an AssertionError shown as LINK DOWN).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable

Problem = tuple[str, str]


def cross_checks(cfg: dict, bad: Iterable[str]) -> list[Problem]:
    """Every rule whose keys are free of schema problems (``bad``: their paths)."""
    bad = set(bad)
    out: list[Problem] = []
    for keys, rule in RULES:
        if not any(_touches(key, path) for key in keys for path in bad):
            out += rule(cfg)
    return out


def _touches(key: str, path: str) -> bool:
    """Whether a problem at ``path`` concerns ``key`` (the key itself, inside it, or a parent
    that is not what it should be)."""
    return (path in ("", key) or path.startswith((key + ".", key + "["))
            or key.startswith(path + "."))


def _split(lines: str) -> list[Problem]:
    """``key.path: message`` lines (the form the parts' own parsers raise) to pairs."""
    out = []
    for line in lines.splitlines():
        path, _, message = line.partition(": ")
        out.append((path.strip(), message or line))
    return out


# --- rules ---------------------------------------------------------------------------------

def _alerts(cfg: dict) -> list[Problem]:
    from agent.core.alerts import AlertConfig

    try:
        AlertConfig.from_config(cfg)
    except ValueError as e:
        return _split(str(e))
    return []


def _cabinet(cfg: dict) -> list[Problem]:
    from agent.health.cabinet import parse_inputs

    try:
        parse_inputs(cfg["cabinet"])
    except ValueError as e:
        return _split(str(e))
    return []


def _pins(cfg: dict) -> list[Problem]:
    out = []
    for pin_key in ("pin", "fault_pin"):
        pin = cfg["amplifier"][pin_key]
        for name, spec in (cfg["cabinet"] or {}).items():
            if pin is not None and spec and spec.get("pin") == pin:
                out.append((f"amplifier.{pin_key}", f"BCM {pin} is already used by cabinet.{name}"))
    return out


def _live_probe(cfg: dict) -> list[Problem]:
    live = cfg["audio"]["live"]
    if live["probe_min_s"] > live["probe_max_s"]:
        return [("audio.live.probe_min_s", f"{live['probe_min_s']:g} is more than probe_max_s "
                 f"({live['probe_max_s']:g})")]
    return []


def _password_file(cfg: dict) -> list[Problem]:
    return _private("mqtt.password_file", cfg["mqtt"]["password_file"])


def _private(key: str, path: str | None) -> list[Problem]:
    """A secret must exist and be private (mode 0600)."""
    from agent.core.mqtt import check_private

    if not path:
        return []
    try:
        check_private(path)
    except FileNotFoundError:
        return [(key, f"{path} not found")]
    except PermissionError as e:
        return [(key, str(e))]
    except OSError as e:
        return [(key, f"cannot read {path}: {e.strerror or e}")]
    return []


def _tls(cfg: dict) -> list[Problem]:
    return tls_problems(cfg["mqtt"])


def tls_problems(mqtt_cfg: dict) -> list[Problem]:
    """The CA, the certificate and its key of an ``mqtt:`` block (the agent's or ttcs-ctl's):
    present, readable, PEM, and belonging together, loaded as the MQTT link will load them."""
    tls = mqtt_cfg.get("tls") or {}
    ca, cert, key = tls.get("ca_file"), tls.get("cert_file"), tls.get("key_file")
    out = key_problems = _private("mqtt.tls.key_file", key)
    if ca:
        out = out + _load_tls("mqtt.tls.ca_file", ca,
                              lambda: ssl.create_default_context(cafile=ca),
                              "no PEM CA certificate in it")
    if key and not cert:
        out.append(("mqtt.tls.key_file", "is set without mqtt.tls.cert_file (the certificate "
                    "it belongs to)"))
    if cert and not key_problems:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        out += _load_tls("mqtt.tls.cert_file", cert, lambda: ctx.load_cert_chain(cert, key),
                         "not a PEM certificate" + (f" matching the key {key}" if key else
                                                    " with its private key"))
    return out


def _load_tls(key: str, path: str, load: Callable[[], object], what: str) -> list[Problem]:
    if not os.path.isfile(path):
        return [(key, f"{path} not found")]
    try:
        load()
    except ssl.SSLError as e:
        return [(key, f"{path}: {what} ({e.reason or e})")]
    except OSError as e:
        return [(key, f"cannot read {path}: {e.strerror or e}")]
    return []


def _font(cfg: dict) -> list[Problem]:
    font = cfg["board"]["font"]
    if not font:
        return []
    if not os.path.isfile(font):
        return [("board.font", f"{font} not found")]
    from PIL import ImageFont

    try:
        ImageFont.truetype(font, 16)
    except OSError as e:
        return [("board.font", f"{font} cannot be loaded as a TrueType/OpenType font: {e}")]
    return []


def _max7219(cfg: dict) -> list[Problem]:
    """What luma.led_matrix's max7219 accepts, and the display it makes: the agent's frames are
    board.width x board.height, and luma refuses (an AssertionError at every frame) any other
    size. luma chains ``cascaded`` modules in one row (``cascaded`` x 8 by 8 LEDs), and an odd
    ``rotate`` swaps width and height."""
    b = cfg["board"]
    width, height, cascaded, rotate = b["width"], b["height"], b["cascaded"], b["rotate"]
    out: list[Problem] = []
    if b["driver"] == "max7219":
        from drivers.board.max7219 import BLOCK_ORIENTATIONS, SPI_SPEEDS_MHZ

        if width % 8 or height % 8:
            out.append(("board.width", f"a max7219 board is made of 8x8 modules: width and "
                        f"height must be multiples of 8, not {width}x{height}"))
        if b["block_orientation"] not in BLOCK_ORIENTATIONS:
            out.append(("board.block_orientation", "must be one of "
                        f"{', '.join(map(str, BLOCK_ORIENTATIONS))}, not {b['block_orientation']}"))
        speeds = [int(mhz * 1_000_000) for mhz in SPI_SPEEDS_MHZ]
        if b["spi_speed_hz"] not in speeds:
            out.append(("board.spi_speed_hz", f"must be one of {', '.join(map(str, speeds))}, "
                        f"not {b['spi_speed_hz']}"))
    elif cascaded is None:
        return out
    if out:
        return out
    chain = (cascaded * 8, 8) if cascaded is not None else (width, height)
    display = chain if rotate % 2 == 0 else chain[::-1]
    if display == (width, height):
        return out
    if cascaded is not None:
        out.append(("board.cascaded", f"{cascaded} modules make a {display[0]}x{display[1]} "
                    f"display (luma chains them in one row of 8x8 modules), but board.width x "
                    f"height is {width}x{height}: leave cascaded null, or set width "
                    f"{display[0]} and height {display[1]}"))
    else:
        out.append(("board.rotate", f"{rotate} turns the {width}x{height} board into a "
                    f"{display[0]}x{display[1]} display, which the {width}x{height} frames do "
                    "not fit: quarter turns work only on square boards; use rotate 0 or 2"))
    return out


def _fb_region(cfg: dict) -> list[Problem]:
    """``[x, y, width, height]`` or empty; whether it fits the screen is known only when the
    framebuffer is opened (the ``board_link`` alert says so)."""
    region = cfg["board"]["framebuffer"]["region"]
    if region and (len(region) != 4 or region[2] < 8 or region[3] < 8):
        return [("board.framebuffer.region", "must be [x, y, width, height] (width and height "
                 f"at least 8), or empty for the whole screen, not {region}")]
    return []


# (keys a rule reads, the rule)
RULES: tuple[tuple[tuple[str, ...], Callable[[dict], list[Problem]]], ...] = (
    (("alerts", "health.disk_min_free_mb"), _alerts),
    (("cabinet",), _cabinet),
    (("amplifier.pin", "amplifier.fault_pin", "cabinet"), _pins),
    (("audio.live",), _live_probe),
    (("mqtt.password_file",), _password_file),
    (("mqtt.tls",), _tls),
    (("board.font",), _font),
    (("board.driver", "board.width", "board.height", "board.cascaded", "board.rotate",
      "board.block_orientation", "board.spi_speed_hz"), _max7219),
    (("board.framebuffer.region",), _fb_region),
)

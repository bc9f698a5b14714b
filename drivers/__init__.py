"""Hardware backends, one abstract base per kind, real and sim implementations chosen by name.

The core (``agent/``) never imports a hardware library; it asks :func:`resolve` for a backend by
kind and name (from the config) and talks to it through the base class of that kind.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

# kind -> name -> "module:Class"; modules are imported only when chosen, so a missing
# hardware library costs nothing unless the config asks for it. The config's choices are these
# names in this order (agent.config): adding a backend is one line here.
REGISTRY: dict[str, dict[str, str]] = {
    "audio": {
        "vlc": "drivers.audio.vlc:VlcAudio",
        "sim": "drivers.audio.base:SimAudio",
    },
    "gpio": {
        "lgpio": "drivers.gpio:RpiGPIO",
        "sim": "drivers.gpio:SimGPIO",
    },
    "level": {
        "sim": "drivers.level:SimMeter",
        "sounddevice": "drivers.level:SoundDeviceMeter",
    },
    "board": {
        "none": "drivers.board.base:NoneBoard",
        "max7219": "drivers.board.max7219:Max7219Board",
        "serial": "drivers.board.alpha:SerialSignBoard",
        "image": "drivers.board.base:ImageBoard",
        "framebuffer": "drivers.board.framebuffer:FramebufferBoard",
    },
    "modem": {
        "at": "drivers.modem.at:AtModem",
        "sim": "drivers.modem.sim:SimModem",
    },
}


class DriverError(RuntimeError):
    """A backend failed in a way the core should report (alert) and survive."""


class DriverUnavailable(DriverError):
    """The backend cannot run on this machine (library or device missing)."""


def resolve(kind: str, name: str):
    """Return the class registered for ``kind``/``name``."""
    try:
        target = REGISTRY[kind][name]
    except KeyError:
        raise DriverUnavailable(f"no {kind} backend named {name!r}") from None
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)

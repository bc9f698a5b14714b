"""MAX7219 LED matrices (8×8 blocks daisy-chained on SPI) through luma.led-matrix.

Options (``board:``): ``width``/``height`` in LEDs (multiples of 8), ``cascaded`` (number of
8×8 blocks, default width×height/64), ``block_orientation`` (0, 90, -90, 180: how each block is
soldered on common modules), ``rotate`` (0-3, quarter turns of the whole display),
``blocks_reversed`` (bool), ``spi_port`` / ``spi_device`` (``/dev/spidev<port>.<device>``,
default 0/0), ``spi_speed_hz`` (default 8 MHz), ``brightness`` (0-255), ``spi`` (default true;
false drives a no-op transport: the full driver code runs on a machine without SPI).

Tests pass ``transport_factory``: a callable returning a luma serial interface (an object with
``data(list)``, ``command(*bytes)``, ``cleanup()``), so a fake can record or fail.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable

from PIL import Image

from drivers import DriverUnavailable
from drivers.board.base import BoardLinkError, LinkedBoard

log = logging.getLogger(__name__)

try:
    import luma.core.error as luma_error
    from luma.core.interface.serial import noop, spi
    from luma.led_matrix.device import max7219
except ImportError:  # pragma: no cover - depends on the machine
    max7219 = None

BLOCK_ORIENTATIONS = (0, 90, -90, 180)
# the SPI clock rates luma accepts, in MHz (MAX7219 is rated to 10 MHz)
SPI_SPEEDS_MHZ = (0.5, 1, 2, 4, 8)


class Max7219Board(LinkedBoard):
    name = "max7219"
    kind = "pixel"

    def __init__(
        self, options: dict, *, transport_factory: Callable[[], object] | None = None
    ) -> None:
        super().__init__(options)
        if max7219 is None:
            raise DriverUnavailable(
                "luma.led-matrix is not installed (pip install luma.led-matrix)"
            )
        if self.width % 8 or self.height % 8:
            raise ValueError("max7219 board width and height must be multiples of 8")
        if options.get("block_orientation", 0) not in BLOCK_ORIENTATIONS:
            raise ValueError(f"block_orientation must be one of {BLOCK_ORIENTATIONS}")
        if int(options.get("spi_speed_hz", 8_000_000)) not in [
            m * 1_000_000 for m in SPI_SPEEDS_MHZ
        ]:
            raise ValueError(f"spi_speed_hz must be one of {SPI_SPEEDS_MHZ} MHz")
        uses_spi = transport_factory is None and options.get("spi", True)
        if uses_spi and importlib.util.find_spec("spidev") is None:
            raise DriverUnavailable("spidev is not installed (pip install spidev; enable SPI)")
        self._transport_factory = transport_factory or self._default_transport
        self._device = None
        self._connect()  # failure is remembered, not raised: show() retries and reports it

    def _default_transport(self):
        if not self.options.get("spi", True):
            return noop()
        # gpio=noop(): a MAX7219 has no data/command or reset line, only SPI
        return spi(
            gpio=noop(),
            port=int(self.options.get("spi_port", 0)),
            device=int(self.options.get("spi_device", 0)),
            bus_speed_hz=int(self.options.get("spi_speed_hz", 8_000_000)),
        )

    def _connect(self) -> bool:
        self._last_attempt = time.monotonic()
        try:
            device = max7219(
                self._transport_factory(),
                width=self.width,
                height=self.height,
                cascaded=self.options.get("cascaded"),
                rotate=int(self.options.get("rotate", 0)),
                block_orientation=self.options.get("block_orientation", 0),
                blocks_arranged_in_reverse_order=bool(self.options.get("blocks_reversed", False)),
            )
            device.contrast(self.brightness)
        except (OSError, luma_error.Error) as exc:
            self._device = None
            self.last_error = f"SPI: {exc}"
            log.warning("max7219 board unavailable: %s", exc)
            return False
        self._device = device
        self.last_error = None
        return True

    def _ensure(self):
        if self._closed:
            raise BoardLinkError("board closed")
        if self._device is None and not self._reconnect():
            raise BoardLinkError(self.last_error or "max7219 not connected")
        return self._device

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (OSError, luma_error.Error) as exc:
            self._drop(exc)
            raise BoardLinkError(f"SPI write failed: {exc}") from exc

    def _drop(self, exc: Exception) -> None:
        self.last_error = f"SPI: {exc}"
        self._device = None
        self._last_attempt = time.monotonic()

    def show(self, frame: Image.Image) -> None:
        frame = self._check_frame(frame)
        device = self._ensure()
        self._call(lambda: device.display(frame))

    def set_brightness(self, level: int) -> None:
        super().set_brightness(level)
        if self._device is not None:
            device = self._device
            self._call(lambda: device.contrast(level))

    def ok(self) -> bool:
        return self._device is not None and super().ok()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        device, self._device = self._device, None
        if device is not None:
            try:
                device.cleanup()  # blank the LEDs, release the SPI device
            except (OSError, luma_error.Error) as exc:
                log.debug("max7219 cleanup failed: %s", exc)
            device.persist = True  # luma's atexit hook must not write to the closed bus

"""Serial LED signs speaking the Alpha Sign Communications Protocol (Alpha, BetaBrite, ...).

One message is one "Write TEXT file" packet::

    NUL×5  SOH  type  address  STX  'A'  label  ESC  position  mode  text  EOT

- NUL×5: sync, lets the sign detect the baud rate; SOH (0x01) starts the packet.
- type: sign type code, ``Z`` = all sign types; address: two hex digits, ``00`` = broadcast.
- STX (0x02) then the command code ``A`` (write TEXT file) and the file label (``A``).
- ESC (0x1B), display position (0x20 middle line: one-line signs; 0x30 fill) and the mode
  code: ``a`` rotate (the text travels right to left: our ``scroll``), ``b`` hold (``static``).
- EOT (0x04) ends the packet. The optional ETX + checksum is not sent.

Character set: these signs have no Vietnamese glyphs, and bytes below 0x20 are protocol
commands. Text is therefore transliterated to printable ASCII (:func:`to_sign_charset`):
NFD decomposition with the combining marks dropped (``ệ`` → ``e``), ``Đ``/``đ`` → ``D``/``d``
(not decomposable), dashes and quotes to ASCII, anything else to ``?``. Tone marks carry
meaning in Vietnamese ("bão" storm vs "bao" bag), so the loss is recorded: ``last_sent`` and
``transliterated`` say what the sign actually got, and it is logged.

Options (``board:``): ``serial_port`` (a device path such as ``/dev/ttyUSB0`` or any pyserial
URL such as ``socket://host:port``), ``baudrate`` (default 9600), ``sign_type`` (default
``Z``), ``sign_address`` (default ``00``), ``file_label`` (default ``A``), ``sign_columns``
(characters visible at once; 0 = unknown: static text longer than this is rotated),
``reconnect_interval_s`` (default 5). Brightness is the sign's own (auto-dimming): recorded,
not sent.
"""

from __future__ import annotations

import logging
import time
import unicodedata

from drivers import DriverUnavailable
from drivers.board.base import BoardLinkError, LinkedBoard

log = logging.getLogger(__name__)

try:
    import serial
except ImportError:  # pragma: no cover - depends on the machine
    serial = None

NUL, SOH, STX, EOT, ESC = b"\x00", b"\x01", b"\x02", b"\x04", b"\x1b"
SYNC = NUL * 5
WRITE_TEXT = b"A"
POSITION_MIDDLE = b"\x20"
MODES = {"scroll": b"a", "static": b"b"}  # a: rotate, b: hold

_ASCII_FOR = {
    "Đ": "D",
    "đ": "d",
    "Ð": "D",
    "ð": "d",
    "Ɖ": "D",
    "—": "-",
    "–": "-",
    "‒": "-",
    "−": "-",
    "‘": "'",
    "’": "'",
    "‚": "'",
    "“": '"',
    "”": '"',
    "„": '"',
    "«": '"',
    "»": '"',
    "…": "...",
    "\u00a0": " ",
    "•": "*",
    "°": "o",
}


def to_sign_charset(text: str) -> str:
    """Vietnamese (any Unicode) text → printable ASCII the sign can show. See module doc."""
    out = []
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch):
            continue
        ch = _ASCII_FOR.get(ch, ch)
        if ch.isspace():
            ch = " "
        out.append(ch if all(" " <= c <= "~" for c in ch) else "?")
    return " ".join("".join(out).split())


def alpha_text_packet(
    text: str,
    mode: bytes = MODES["scroll"],
    *,
    sign_type: str = "Z",
    address: str = "00",
    label: str = "A",
) -> bytes:
    """One Alpha "write TEXT file" packet; ``text`` must already be in the sign charset."""
    body = text.encode("ascii")
    if any(b < 0x20 or b > 0x7E for b in body):
        raise ValueError("text holds bytes outside printable ASCII")
    return (
        SYNC
        + SOH
        + sign_type.encode("ascii")
        + address.encode("ascii")
        + STX
        + WRITE_TEXT
        + label.encode("ascii")
        + ESC
        + POSITION_MIDDLE
        + mode
        + body
        + EOT
    )


class SerialSignBoard(LinkedBoard):
    name = "serial"
    kind = "text"

    def __init__(self, options: dict) -> None:
        super().__init__(options)
        if serial is None:
            raise DriverUnavailable("pyserial is not installed (pip install pyserial)")
        if not options.get("serial_port"):
            raise ValueError("board.serial_port is required for the serial board")
        self.port = str(options["serial_port"])
        self.baudrate = int(options.get("baudrate", 9600))
        self.sign_type = str(options.get("sign_type", "Z"))
        self.address = str(options.get("sign_address", "00"))
        self.label = str(options.get("file_label", "A"))
        self.columns = int(options.get("sign_columns", 0))
        self._conn = None
        self.packets = 0
        self._connect()  # failure is remembered, not raised: show_text() retries and reports it

    def _connect(self) -> bool:
        self._last_attempt = time.monotonic()
        try:
            self._conn = serial.serial_for_url(
                self.port, baudrate=self.baudrate, timeout=1, write_timeout=2
            )
        except (OSError, serial.SerialException, ValueError) as exc:
            self._conn = None
            self.last_error = f"{self.port}: {exc}"
            log.warning("serial sign unavailable: %s", self.last_error)
            return False
        self.last_error = None
        return True

    def _ensure(self):
        if self._closed:
            raise BoardLinkError("board closed")
        if self._conn is None and not self._reconnect():
            raise BoardLinkError(self.last_error or f"{self.port}: not connected")
        return self._conn

    def show_text(self, text: str, effect: str = "scroll") -> None:
        sent = to_sign_charset(text)
        mode = self._mode(sent, effect)
        packet = alpha_text_packet(
            sent, mode, sign_type=self.sign_type, address=self.address, label=self.label
        )
        conn = self._ensure()
        try:
            conn.write(packet)
            conn.flush()
        except (OSError, serial.SerialException) as exc:
            self._drop(exc)
            raise BoardLinkError(f"{self.port}: write failed: {exc}") from exc
        self.packets += 1
        self.last_sent = sent
        self.transliterated = sent != unicodedata.normalize("NFC", " ".join(text.split()))
        if self.transliterated:
            log.info("serial sign shows %r for %r (no Vietnamese glyphs on the sign)", sent, text)

    def _mode(self, sent: str, effect: str) -> bytes:
        if effect == "static" and not (self.columns and len(sent) > self.columns):
            return MODES["static"]
        return MODES["scroll"]

    def _drop(self, exc: Exception) -> None:
        self.last_error = f"{self.port}: {exc}"
        conn, self._conn = self._conn, None
        self._last_attempt = time.monotonic()
        try:
            conn.close()
        except (OSError, serial.SerialException):
            pass

    def ok(self) -> bool:
        return self._conn is not None and super().ok()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except (OSError, serial.SerialException) as exc:
                log.debug("serial close failed: %s", exc)

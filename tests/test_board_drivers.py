"""Board drivers: none, image, MAX7219 on a fake SPI transport, an Alpha serial sign on a pty."""

from __future__ import annotations

import importlib.util
import os
import select
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageChops

import drivers
from drivers.board.alpha import SerialSignBoard, to_sign_charset
from drivers.board.base import BoardLinkError, ImageBoard, NoneBoard
from drivers.board.max7219 import Max7219Board


def frame(width: int = 64, height: int = 16, lit: tuple[int, int] | None = None) -> Image.Image:
    image = Image.new("1", (width, height), 0)
    if lit:
        image.putpixel(lit, 255)
    return image


def test_registry_names_resolve_to_these_classes() -> None:
    assert drivers.resolve("board", "none") is NoneBoard
    assert drivers.resolve("board", "image") is ImageBoard
    assert drivers.resolve("board", "max7219") is Max7219Board
    assert drivers.resolve("board", "serial") is SerialSignBoard
    assert issubclass(BoardLinkError, drivers.DriverError)


# --- none and image ------------------------------------------------------------------------


def test_none_board_accepts_everything() -> None:
    board = NoneBoard({"driver": "none", "width": 64, "height": 16})
    board.show(frame())
    board.show_text("Bão", "scroll")
    board.set_brightness(10)
    assert board.ok() and board.kind == "pixel"
    board.close()
    board.close()
    assert not board.ok()


def test_image_board_writes_each_frame_as_png(tmp_path: Path) -> None:
    path = tmp_path / "state" / "board.png"
    board = ImageBoard({"driver": "image", "width": 64, "height": 16, "image_path": str(path)})
    first, second = frame(lit=(3, 4)), frame(lit=(60, 15))
    board.show(first)
    board.show(second)
    assert board.frames == 2
    written = Image.open(path)
    assert written.size == (64, 16)
    assert ImageChops.difference(written.convert("1"), second).getbbox() is None
    assert ImageChops.difference(board.last_frame, second).getbbox() is None
    assert [p.name for p in path.parent.iterdir()] == ["board.png"], "temp files left behind"
    with pytest.raises(NotImplementedError):
        board.show_text("x")


def test_image_board_scale_and_size_check(tmp_path: Path) -> None:
    path = tmp_path / "board.png"
    board = ImageBoard({"width": 64, "height": 16, "image_path": str(path), "image_scale": 4})
    board.show(frame(lit=(1, 1)))
    written = Image.open(path).convert("1")
    assert written.size == (256, 64)
    assert written.getbbox() == (4, 4, 8, 8)
    with pytest.raises(ValueError, match="128x32"):
        board.show(frame(128, 32))


def test_image_board_write_failure_is_a_link_error_then_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder should be")
    board = ImageBoard({"width": 64, "height": 16, "image_path": str(blocker / "board.png")})
    with pytest.raises(BoardLinkError):
        board.show(frame())
    assert not board.ok()
    blocker.unlink()
    board.show(frame())
    assert board.ok() and (blocker / "board.png").is_file()


# --- MAX7219 -------------------------------------------------------------------------------


class FakeSpi:
    """A luma serial interface that records register writes and can be unplugged."""

    def __init__(self) -> None:
        self.writes: list[list[int]] = []
        self.unplugged = False
        self.cleaned = False

    def data(self, data) -> None:
        if self.unplugged:
            raise OSError(121, "Remote I/O error")
        self.writes.append(list(data))

    def command(self, *cmd) -> None:
        self.data(list(cmd))

    def cleanup(self) -> None:
        self.cleaned = True

    def registers(self, start: int = 0) -> list[tuple[int, int]]:
        """(register, value) pairs written since ``start``."""
        pairs = []
        for chunk in self.writes[start:]:
            pairs += list(zip(chunk[0::2], chunk[1::2], strict=True))
        return pairs


DIGIT_REGISTERS = range(1, 9)
INTENSITY = 0x0A


def make_max(options: dict | None = None) -> tuple[Max7219Board, list[FakeSpi]]:
    transports: list[FakeSpi] = []

    def factory() -> FakeSpi:
        transports.append(FakeSpi())
        return transports[-1]

    opts = {
        "driver": "max7219",
        "width": 64,
        "height": 16,
        "reconnect_interval_s": 0,
        **(options or {}),
    }
    return Max7219Board(opts, transport_factory=factory), transports


def test_max7219_one_lit_led_sets_one_bit_in_one_register() -> None:
    board, (spi,) = make_max()
    assert board.ok() and board.kind == "pixel"
    mark = len(spi.writes)
    board.show(frame(lit=(10, 5)))
    digits = [(reg, val) for reg, val in spi.registers(mark) if reg in DIGIT_REGISTERS]
    assert len(digits) == 8 * 16, "each of 16 cascaded blocks gets its 8 digit rows"
    lit = [val for _, val in digits if val]
    assert len(lit) == 1 and bin(lit[0]).count("1") == 1


def test_max7219_all_on_frame_and_brightness() -> None:
    board, (spi,) = make_max({"brightness": 64})
    assert (INTENSITY, 64 >> 4) in spi.registers()
    mark = len(spi.writes)
    board.show(Image.new("1", (64, 16), 255))
    assert {val for reg, val in spi.registers(mark) if reg in DIGIT_REGISTERS} == {0xFF}
    mark = len(spi.writes)
    board.set_brightness(255)
    assert spi.registers(mark) == [(INTENSITY, 0x0F)] * 16
    with pytest.raises(ValueError):
        board.set_brightness(256)


def test_max7219_spi_failure_raises_link_error_and_reconnects() -> None:
    board, transports = make_max()
    transports[0].unplugged = True
    with pytest.raises(BoardLinkError, match="SPI"):
        board.show(frame())
    assert not board.ok()
    board.show(frame(lit=(0, 0)))  # reopens through the factory
    assert len(transports) == 2 and board.ok()
    assert any(val for reg, val in transports[1].registers() if reg in DIGIT_REGISTERS)


def test_max7219_reconnect_is_rate_limited() -> None:
    board, transports = make_max({"reconnect_interval_s": 60})
    transports[0].unplugged = True
    for _ in range(3):
        with pytest.raises(BoardLinkError):
            board.show(frame())
    assert len(transports) == 1, "reopened more often than reconnect_interval_s allows"


def test_max7219_close_blanks_and_is_idempotent() -> None:
    board, (spi,) = make_max()
    board.close()
    board.close()
    assert spi.cleaned and not board.ok()
    with pytest.raises(BoardLinkError):
        board.show(frame())


def test_max7219_without_spi_runs_on_noop_transport() -> None:
    board = Max7219Board({"width": 32, "height": 8, "spi": False})
    board.show(frame(32, 8, lit=(1, 1)))
    assert board.ok()
    with pytest.raises(ValueError):
        Max7219Board({"width": 30, "height": 8, "spi": False})


def test_max7219_missing_spi_device_is_reported_not_raised_at_start() -> None:
    from luma.core.error import DeviceNotFoundError

    def absent():
        raise DeviceNotFoundError("SPI device not found")

    board = Max7219Board(
        {"width": 32, "height": 8, "reconnect_interval_s": 0}, transport_factory=absent
    )
    assert not board.ok() and "not found" in board.last_error
    with pytest.raises(BoardLinkError, match="not found"):
        board.show(frame(32, 8))


def test_max7219_option_checks() -> None:
    with pytest.raises(ValueError, match="block_orientation"):
        Max7219Board({"width": 32, "height": 8, "spi": False, "block_orientation": 45})
    with pytest.raises(ValueError, match="spi_speed_hz"):
        Max7219Board({"width": 32, "height": 8, "spi": False, "spi_speed_hz": 3_000_000})
    if importlib.util.find_spec("spidev") is None:
        with pytest.raises(drivers.DriverUnavailable, match="spidev"):
            Max7219Board({"width": 32, "height": 8})


# --- Alpha serial sign on a pty ---------------------------------------------------------


class FakeAlphaSign:
    """The far end of a pty, parsing Alpha "write TEXT file" packets byte by byte against
    the documented frame: NUL×5 SOH type addr(2) STX 'A' label ESC position mode text EOT."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        self._slave = slave
        self.buffer = b""

    def read_packet(self, timeout: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\x04" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no complete packet, got {self.buffer!r}"
            if select.select([self.master], [], [], left)[0]:
                self.buffer += os.read(self.master, 4096)
        raw, _, self.buffer = self.buffer.partition(b"\x04")
        return self.parse(raw + b"\x04")

    @staticmethod
    def parse(raw: bytes) -> dict:
        assert raw[:5] == b"\x00" * 5, "sync: five NULs"
        assert raw[5] == 0x01, "SOH"
        type_code, address = chr(raw[6]), raw[7:9].decode()
        assert raw[9] == 0x02, "STX"
        assert raw[10:11] == b"A", "command code A: write TEXT file"
        label = chr(raw[11])
        assert raw[12] == 0x1B, "ESC before the mode field"
        position, mode = raw[13], chr(raw[14])
        text, end = raw[15:-1], raw[-1]
        assert end == 0x04, "EOT"
        assert all(0x20 <= b <= 0x7E for b in text), "text must be printable ASCII"
        return {
            "type": type_code,
            "address": address,
            "label": label,
            "position": position,
            "mode": mode,
            "text": text.decode("ascii"),
        }

    def close(self) -> None:
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def sign():
    fake = FakeAlphaSign()
    yield fake
    fake.close()


def serial_board(port: str, **options) -> SerialSignBoard:
    return SerialSignBoard(
        {
            "driver": "serial",
            "serial_port": port,
            "baudrate": 9600,
            "reconnect_interval_s": 0,
            **options,
        }
    )


def test_alpha_packet_on_the_wire(sign: FakeAlphaSign) -> None:
    board = serial_board(sign.slave_name)
    assert board.kind == "text" and board.ok()
    board.show_text("THÔNG BÁO: Bão số 3 đổ bộ — Đề nghị người dân ở trong nhà", "scroll")
    packet = sign.read_packet()
    assert packet == {
        "type": "Z",
        "address": "00",
        "label": "A",
        "position": 0x20,
        "mode": "a",
        "text": "THONG BAO: Bao so 3 do bo - De nghi nguoi dan o trong nha",
    }
    assert board.transliterated and board.last_sent == packet["text"]
    board.show_text("Họp 19h", "static")
    assert sign.read_packet()["mode"] == "b"
    with pytest.raises(NotImplementedError):
        board.show(frame())
    board.close()


def test_alpha_addressing_options_and_long_static_rotates(sign: FakeAlphaSign) -> None:
    board = serial_board(
        sign.slave_name, sign_type="!", sign_address="0A", file_label="B", sign_columns=10
    )
    board.show_text("Ệ ỗ ữ ặ Đ", "static")
    packet = sign.read_packet()
    assert (packet["type"], packet["address"], packet["label"]) == ("!", "0A", "B")
    assert packet["text"] == "E o u a D" and packet["mode"] == "b"
    board.show_text("Đề nghị người dân ở trong nhà", "static")
    assert sign.read_packet()["mode"] == "a", "text wider than the sign must rotate"
    board.show_text("plain ASCII", "static")
    assert sign.read_packet()["text"] == "plain ASCII" and not board.transliterated


def test_serial_link_loss_and_recovery(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB0"  # a stable name, as udev gives a USB adapter
    first = FakeAlphaSign()
    port.symlink_to(first.slave_name)
    board = serial_board(str(port))
    board.show_text("một")
    assert first.read_packet()["text"] == "mot"
    first.close()  # the cable is pulled: the pty's far end is gone
    with pytest.raises(BoardLinkError):
        board.show_text("hai")
    assert not board.ok()
    port.unlink()  # and the device node vanishes
    with pytest.raises(BoardLinkError, match="ttyUSB0"):
        board.show_text("hai")
    second = FakeAlphaSign()  # plugged back in
    port.symlink_to(second.slave_name)
    try:
        board.show_text("ba")
        assert second.read_packet()["text"] == "ba" and board.ok()
    finally:
        board.close()
        second.close()


def test_serial_port_missing_at_start_is_reported_not_raised(tmp_path: Path) -> None:
    board = serial_board(str(tmp_path / "nope"))
    assert not board.ok() and "nope" in board.last_error
    with pytest.raises(BoardLinkError):
        board.show_text("x")


@given(st.text(max_size=80))
def test_sign_charset_is_always_printable_ascii(text: str) -> None:
    out = to_sign_charset(text)
    assert all(" " <= c <= "~" for c in out)
    assert len(out) <= len(text) * 3


def test_sign_charset_mapping() -> None:
    assert to_sign_charset("Đường ĐT 661 “ngập” … 25°C\x1b\x04") == 'Duong DT 661 "ngap" ... 25oC??'

"""A full-colour screen on the Linux framebuffer: an LCD television or an LED wall over HDMI.

An LED wall's sending card (Novastar, Colorlight, Linsn…) takes the HDMI picture and maps one
region of it onto its panels; an LCD shows the whole picture. The Raspberry Pi's KMS driver
gives both as ``/dev/fb0``. This driver draws whole pages (RGB images the size of
``region``) and reads them back, so the agent records what the screen actually holds.

Options (``board.framebuffer``): ``device`` (default ``/dev/fb0``), ``sysfs`` (default
``/sys/class/graphics/fb0``: the geometry is read from its ``virtual_size`` ``"W,H"``,
``bits_per_pixel`` and ``stride`` files), ``region`` (``[x, y, width, height]``, default the
whole screen). Pixel formats: 16 bits per pixel is RGB565 little-endian, 32 is XRGB8888
little-endian (bytes B, G, R, X); a line may be longer than ``width × bytes per pixel``
(``stride``), the padding is never touched.

Geometry is read again before each page: a screen that changed mode (another television
plugged in) fails that page with :class:`BoardLinkError` and is reopened with its new size
at the next one (the core then renders for the new size). Test stand-in: a regular file of
``stride × height`` bytes and a folder with the three sysfs files, through this same code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import stat
from dataclasses import dataclass

from PIL import Image, ImageChops

from drivers.board.base import BoardDriver, BoardLinkError

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "/dev/fb0"
DEFAULT_SYSFS = "/sys/class/graphics/fb0"
FORMATS = {16: "RGB565", 32: "XRGB8888"}
MIN_SIDE = 8
BAND_ROWS = 64  # pages are converted and written this many rows at a time (small buffers)
MAX_SIDE = 16384

# RGB565 packing: two lookup tables per byte (bit fields that never overlap, so adding them
# is an OR); Pillow has no RGB565 packer, but it unpacks the format ("BGR;16").
_LO_G = [(v << 3) & 0xE0 for v in range(256)]
_LO_B = [v >> 3 for v in range(256)]
_HI_R = [v & 0xF8 for v in range(256)]
_HI_G = [v >> 5 for v in range(256)]


@dataclass(frozen=True)
class Geometry:
    """The screen as sysfs describes it."""

    width: int
    height: int
    bpp: int
    stride: int

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8


@dataclass(frozen=True)
class Readback:
    """What the framebuffer region holds: ``data`` in the screen's own pixel format, row
    after row without the line padding; ``sha256`` is of exactly those bytes."""

    data: bytes
    width: int
    height: int
    bpp: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def format(self) -> str:
        return FORMATS[self.bpp]

    def image(self) -> Image.Image:
        """The region as an RGB image."""
        return from_raw(self.data, self.width, self.height, self.bpp)

    def thumbnail(self, longest: int) -> Image.Image:
        """The region scaled down (box filter) to at most ``longest`` pixels on its longer
        side, decoded band by band: no full-size copy of the screen is made."""
        factor = max(1, -(-max(self.width, self.height) // longest))
        line = self.width * self.bpp // 8
        band = factor * max(1, BAND_ROWS // factor)
        out = Image.new("RGB", (-(-self.width // factor), -(-self.height // factor)))
        view = memoryview(self.data)
        for top in range(0, self.height, band):
            rows = min(band, self.height - top)
            part = from_raw(view[top * line:(top + rows) * line], self.width, rows, self.bpp)
            out.paste(part.reduce(factor), (0, top // factor))
        return out


def read_geometry(sysfs: str) -> Geometry:
    """Parse the sysfs folder of a framebuffer. Raises :class:`BoardLinkError`."""
    try:
        size = _read(sysfs, "virtual_size")
        bpp = int(_read(sysfs, "bits_per_pixel"))
        stride = int(_read(sysfs, "stride"))
        width, height = (int(v) for v in size.split(","))
    except (OSError, ValueError) as exc:
        raise BoardLinkError(f"no framebuffer geometry in {sysfs}: {exc}") from exc
    if bpp not in FORMATS:
        raise BoardLinkError(f"{sysfs}: {bpp} bits per pixel not supported (16 or 32)")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise BoardLinkError(f"{sysfs}: screen size {width}x{height} out of range")
    if stride < width * bpp // 8:
        raise BoardLinkError(f"{sysfs}: stride {stride} shorter than a line of {width} pixels")
    return Geometry(width, height, bpp, stride)


def _read(folder: str, name: str) -> str:
    with open(os.path.join(folder, name), encoding="ascii") as f:
        return f.read(64).strip()


def to_raw(image: Image.Image, bpp: int) -> bytes:
    """An RGB image in the framebuffer's pixel format, row after row (no padding)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if bpp == 32:
        return image.tobytes("raw", "BGRX")
    r, g, b = image.split()
    lo = ImageChops.add(g.point(_LO_G), b.point(_LO_B))
    hi = ImageChops.add(r.point(_HI_R), g.point(_HI_G))
    return Image.merge("LA", (lo, hi)).tobytes()  # little-endian: low byte first


def from_raw(data: bytes, width: int, height: int, bpp: int) -> Image.Image:
    """Framebuffer pixels (no padding) as an RGB image."""
    return Image.frombytes("RGB", (width, height), data, "raw",
                           "BGRX" if bpp == 32 else "BGR;16")


def check_region(region, geometry: Geometry) -> tuple[int, int, int, int]:
    """``[x, y, w, h]`` inside the screen (the whole screen when empty or None)."""
    if not region:
        return (0, 0, geometry.width, geometry.height)
    if len(region) != 4 or not all(isinstance(v, int) and not isinstance(v, bool)
                                   for v in region):
        raise ValueError(f"board.framebuffer.region must be [x, y, width, height], not {region}")
    x, y, w, h = region
    if w < MIN_SIDE or h < MIN_SIDE or x < 0 or y < 0:
        raise ValueError(f"board.framebuffer.region {region}: width and height at least "
                         f"{MIN_SIDE}, x and y not negative")
    if x + w > geometry.width or y + h > geometry.height:
        raise BoardLinkError(f"region {region} does not fit the {geometry.width}x"
                             f"{geometry.height} screen")
    return (x, y, w, h)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1024 * 1024


def release_large_buffers() -> bool:
    """Ask glibc to give large freed buffers back to the system: pages, decoded images and
    read-backs are megabytes each, made on the driver and image threads. By default glibc
    raises its mmap threshold after the first such buffer is freed and serves the next ones
    from per-thread heaps that keep their peak (measured: 60 MB above the idle agent after
    a few 1920x1080 pages, 24 MB with this). A fixed 1 MiB threshold and two arenas, as the
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_ARENA_MAX`` environment variables would set.
    False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, 2))


class FramebufferBoard(BoardDriver):
    """A page board (``kind = "page"``): :meth:`show` takes an RGB image of ``width`` ×
    ``height`` (the region's size, known once the screen was opened), :meth:`read_back`
    returns what the region holds. Brightness is the screen's own (recorded, not applied)."""

    name = "framebuffer"
    kind = "page"

    def __init__(self, options: dict) -> None:
        super().__init__(options)
        fb = options.get("framebuffer") or {}
        self.device = str(fb.get("device") or DEFAULT_DEVICE)
        self.sysfs = str(fb.get("sysfs") or DEFAULT_SYSFS)
        self._region_opt = list(fb.get("region") or [])
        if self._region_opt:  # a malformed region is a config error: refuse to start
            check_region(self._region_opt, Geometry(MAX_SIDE, MAX_SIDE, 32, MAX_SIDE * 4))
        self.geometry: Geometry | None = None
        self.region: tuple[int, int, int, int] | None = None
        self._fd: int | None = None
        self.pages = 0  # pages drawn (test helper)
        release_large_buffers()
        self._connect()

    # --- the link ------------------------------------------------------------------------

    def _connect(self) -> bool:
        self._drop()
        try:
            geometry = read_geometry(self.sysfs)
            region = check_region(self._region_opt, geometry)
            fd = os.open(self.device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except (BoardLinkError, OSError) as exc:
            self.last_error = str(exc)
            log.warning("framebuffer unavailable: %s", exc)
            return False
        try:
            self._check_size(fd, geometry)
        except BoardLinkError as exc:
            os.close(fd)
            self.last_error = str(exc)
            return False
        self._fd, self.geometry, self.region = fd, geometry, region
        self.width, self.height = region[2], region[3]
        self.last_error = None
        return True

    def _check_size(self, fd: int, geometry: Geometry) -> None:
        st = os.fstat(fd)
        need = geometry.stride * geometry.height
        if stat.S_ISREG(st.st_mode) and st.st_size < need:  # a device reports no size
            raise BoardLinkError(f"{self.device} holds {st.st_size} bytes, the screen needs "
                                 f"{need} ({geometry.width}x{geometry.height}, stride "
                                 f"{geometry.stride})")

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _ensure(self) -> int:
        """The open device, its geometry unchanged since it was opened (reopened if not)."""
        if self._closed:
            raise BoardLinkError("board closed")
        if self._fd is not None:
            try:
                now = read_geometry(self.sysfs)
            except BoardLinkError as exc:
                self._drop()
                self.last_error = str(exc)
                raise
            if now != self.geometry:
                self._drop()
                self.last_error = (f"screen changed from {self._describe(self.geometry)} to "
                                   f"{self._describe(now)}")
                raise BoardLinkError(self.last_error)
        if self._fd is None and not self._connect():
            raise BoardLinkError(self.last_error or "framebuffer not open")
        return self._fd

    @staticmethod
    def _describe(g: Geometry | None) -> str:
        return "nothing" if g is None else f"{g.width}x{g.height} at {g.bpp} bpp"

    # --- pages -----------------------------------------------------------------------------

    def show(self, frame: Image.Image) -> None:
        """Draw an RGB page of exactly the region's size."""
        fd = self._ensure()
        if frame.size != (self.width, self.height):
            raise BoardLinkError(f"page is {frame.size[0]}x{frame.size[1]}, the region is "
                                 f"{self.width}x{self.height}")
        g, (x, y, w, h) = self.geometry, self.region
        line = w * g.bytes_per_pixel
        digest = hashlib.sha256()
        try:
            for top in range(0, h, BAND_ROWS):  # a band at a time: no full-screen buffers
                rows = min(BAND_ROWS, h - top)
                data = to_raw(frame.crop((0, top, w, top + rows)), g.bpp)
                digest.update(data)
                if x == 0 and line == g.stride:
                    self._write(fd, data, (y + top) * g.stride)
                    continue
                for row in range(rows):
                    self._write(fd, data[row * line:(row + 1) * line],
                                (y + top + row) * g.stride + x * g.bytes_per_pixel)
        except OSError as exc:
            self._drop()
            self.last_error = f"cannot write {self.device}: {exc}"
            raise BoardLinkError(self.last_error) from exc
        self.written_sha256 = digest.hexdigest()
        self.pages += 1

    @staticmethod
    def _write(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError("short write")
            view, offset = view[written:], offset + written

    def read_back(self) -> Readback:
        """The region as the framebuffer holds it now."""
        fd = self._ensure()
        g, (x, y, w, h) = self.geometry, self.region
        line = w * g.bytes_per_pixel
        try:
            if x == 0 and line == g.stride:
                data = os.pread(fd, line * h, y * g.stride)
            else:
                data = b"".join(os.pread(fd, line, (y + row) * g.stride + x * g.bytes_per_pixel)
                                for row in range(h))
        except OSError as exc:
            self._drop()
            self.last_error = f"cannot read {self.device}: {exc}"
            raise BoardLinkError(self.last_error) from exc
        if len(data) != line * h:
            self._drop()
            self.last_error = f"{self.device} ended before the region ({len(data)} bytes)"
            raise BoardLinkError(self.last_error)
        return Readback(data, w, h, g.bpp)

    def ok(self) -> bool:
        return self._fd is not None and super().ok()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._drop()


def make_standin(folder: str, width: int, height: int, bpp: int = 32, *, pad: int = 0,
                 fill: int = 0) -> dict:
    """A framebuffer stand-in for tests, benchmarks and demos: ``folder/fb`` (a file of
    ``stride × height`` bytes, every byte ``fill``) and ``folder/sysfs`` (``virtual_size``,
    ``bits_per_pixel``, ``stride``, as the kernel writes them), with ``pad`` bytes of line
    padding. Returns the ``board.framebuffer`` options that point at it."""
    stride = width * bpp // 8 + pad
    sysfs = os.path.join(folder, "sysfs")
    os.makedirs(sysfs, exist_ok=True)
    for name, value in (("virtual_size", f"{width},{height}"), ("bits_per_pixel", bpp),
                        ("stride", stride)):
        with open(os.path.join(sysfs, name), "w", encoding="ascii") as f:
            f.write(f"{value}\n")
    device = os.path.join(folder, "fb")
    with open(device, "wb") as f:
        f.write(bytes([fill]) * (stride * height))
    return {"device": device, "sysfs": sysfs}

"""Images of board pages: fetched as verified media, decoded within a pixel budget, kept decoded.

An image is ``{"url", "sha256"}`` like audio media, and comes the same way: through the
agent's one media cache (:class:`agent.audio.media.MediaCache`: ``security.media_hosts``, the
sha256 checked before the file takes its name, the quota). Then it is decoded here, in a
worker thread, before any page uses it:

- PNG or JPEG only (by content, not by name);
- a pixel budget (``board.framebuffer.max_image_pixels``): the size the header declares is
  checked *before* decoding, so a decompression bomb (a few kilobytes that inflate to
  gigabytes) is refused, never rendered; Pillow's own guard (``DecompressionBombError``)
  stays as a second line;
- JPEG decoded at a reduced scale when larger than the region (``Image.draft``: cheaper in
  time and memory), every image scaled down to fit the region;
- a truncated or damaged file fails to decode and is refused.

A refusal is a :class:`~agent.audio.hosts.MediaError` with the reason ``bad_image`` (or the
cache's ``media_host``, ``media_checksum``, ``media_unavailable``). Decoded images are kept
in memory for the pages that show (the last ``keep``, least recently used dropped); one
dropped is decoded again from the cache when its page comes back.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image, ImageOps

from agent.audio.hosts import MediaError
from agent.audio.media import MediaCache
from agent.protocol import Priority

log = logging.getLogger(__name__)

BAD_IMAGE = "bad_image"
FORMATS = ("PNG", "JPEG")
KEEP = 2  # decoded images kept (each at most the region's size: up to 8 MB at 1920x1080)


def decode(path: str, max_pixels: int, fit: tuple[int, int]) -> Image.Image:
    """The image at ``path`` as RGB (RGBA when it has transparency), at most ``fit`` in size.
    Raises :class:`MediaError` (``bad_image``) for anything else than a sound PNG or JPEG
    within ``max_pixels``."""
    try:
        with Image.open(path) as im:
            if im.format not in FORMATS:
                raise MediaError(BAD_IMAGE, f"{im.format or 'unknown'} image: only PNG or "
                                 "JPEG are shown")
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(BAD_IMAGE, f"{width}x{height} is {width * height} pixels, "
                                 f"over the budget of {max_pixels}: not decoded (a "
                                 "decompression bomb?)")
            if im.format == "JPEG":
                im.draft("RGB", fit)  # decode at 1/2, 1/4 or 1/8 when that still covers fit
            im.load()
            out = im.convert("RGBA" if _has_alpha(im) else "RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(BAD_IMAGE, f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's decode errors
        raise MediaError(BAD_IMAGE, f"cannot decode the image: {exc}") from None
    if out.width > fit[0] or out.height > fit[1]:
        out = ImageOps.contain(out, fit, Image.Resampling.LANCZOS)
    return out


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


class BoardImages:
    """Prepares page images off the core thread and hands out decoded ones.

    ``size``: the region's size now (images are fitted to it); ``post``: runs a callback on
    the core thread. :meth:`prepare` and :meth:`refused` are for the core thread,
    :meth:`get` for the thread that draws."""

    def __init__(self, cache: MediaCache, *, max_pixels: int,
                 size: Callable[[], tuple[int, int]], post: Callable[..., None],
                 keep: int = KEEP, workers: int = 2, own_cache: bool = False) -> None:
        self.cache = cache
        self._own_cache = own_cache  # opened for the board alone: closed with it
        self.max_pixels = max_pixels
        self._size = size
        self._post = post
        self._keep = keep
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="board-image")
        self._lock = threading.Lock()
        self._decoded: OrderedDict[str, Image.Image] = OrderedDict()
        self._ready: set[str] = set()  # decoded once without fault
        self._refused: dict[str, MediaError] = {}
        self._waiting: dict[str, list[Callable[[str, MediaError | None], None]]] = {}

    def ready(self, sha: str) -> bool:
        return sha.lower() in self._ready

    def refused(self, sha: str) -> MediaError | None:
        return self._refused.get(sha.lower())

    def prepare(self, image: dict, then: Callable[[str, MediaError | None], None],
                lane: Priority = Priority.NORMAL) -> None:
        """Fetch ``image`` in the media cache's ``lane`` (an emergency's image never waits
        behind normal downloads), then decode it in a worker; ``then(sha, error)`` runs on
        the core thread (error None: ready). A ready image answers at once, on this
        thread."""
        sha = image["sha256"].lower()
        if sha in self._ready:
            then(sha, None)
            return
        if sha in self._waiting:
            self._waiting[sha].append(then)
            return
        self._waiting[sha] = [then]
        try:
            self.cache.check_url(image["url"])  # refused at once, no thread
        except MediaError as exc:
            self._finish(sha, exc)
            return
        fetched = self.cache.submit(image["url"], sha, lane)
        fetched.add_done_callback(lambda fut: self._decode_later(fut, sha))

    def _decode_later(self, fetched: Future, sha: str) -> None:
        try:
            self._pool.submit(self._work, fetched, sha)
        except RuntimeError:  # closed: the agent is stopping
            log.debug("board image %s not decoded: stopping", sha)

    def _work(self, fetched: Future, sha: str) -> None:
        try:
            path = fetched.result()
            decoded = decode(path, self.max_pixels, self._size())
            self._keep_decoded(sha, decoded)
            error = None
        except MediaError as exc:
            error = exc
        except Exception as exc:  # a worker must answer, whatever happened (a cancelled fetch)
            log.exception("board image %s", sha)
            error = MediaError("media_unavailable", f"{type(exc).__name__}: {exc}")
        self._post(self._finish, sha, error)

    def _finish(self, sha: str, error: MediaError | None) -> None:
        if error is None:
            self._ready.add(sha)
            self._refused.pop(sha, None)
        else:
            self._refused[sha] = error
            log.warning("board image %s refused (%s): %s", sha, error.reason, error.message)
        for then in self._waiting.pop(sha, []):
            then(sha, error)

    def get(self, sha: str) -> Image.Image | None:
        """The decoded image (decoded again from the cache when it was dropped), or None
        when it is not ready or no longer in the cache."""
        sha = sha.lower()
        if sha not in self._ready:
            return None
        with self._lock:
            image = self._decoded.get(sha)
            if image is not None:
                self._decoded.move_to_end(sha)
        if image is not None:
            return image
        path = self.cache.path_for(sha)
        if path is None:
            return None
        try:
            image = decode(path, self.max_pixels, self._size())
        except MediaError as exc:
            log.warning("board image %s: %s", sha, exc.message)
            return None
        self._keep_decoded(sha, image)
        return image

    def _keep_decoded(self, sha: str, image: Image.Image) -> None:
        with self._lock:
            self._decoded[sha] = image
            self._decoded.move_to_end(sha)
            while len(self._decoded) > self._keep:
                self._decoded.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._own_cache:
            self.cache.close()

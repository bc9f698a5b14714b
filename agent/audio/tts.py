"""On-device text-to-speech for ``say``: engines render WAV files, cached by content.

A rendering is cached as ``<cache_dir>/<key>.wav`` where ``key`` is the sha256 of (engine,
voice, lang, NFC text): the same bulletin repeated daily is rendered once. Files are written to a
temp name in the same folder, checked to be a non-empty WAV, fsynced and renamed into place.

``render`` blocks (espeak-ng takes about a second on a Pi Zero 2, Piper longer): the core runs
it in a worker thread (e.g. the media cache's pool) and enqueues the result. It is thread-safe:
two renders of the same text race harmlessly to the same final file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import unicodedata
import wave
from abc import ABC, abstractmethod
from pathlib import Path

from agent.args import SAY_TEXT
from drivers.fsutil import fsync_dir

log = logging.getLogger(__name__)

MAX_TEXT = SAY_TEXT.max_len


class TtsError(RuntimeError):
    """Rendering failed: the engine is missing, refused the text, or wrote no audio."""


class TtsEngine(ABC):
    name = "abstract"

    def __init__(self, cache_dir: str | os.PathLike, *, timeout_s: float = 120) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        for p in self.dir.glob(".*.tmp.wav"):  # left by a crash mid-render
            p.unlink(missing_ok=True)

    @abstractmethod
    def voice(self, lang: str) -> str:
        """The voice (or model) used for ``lang``; part of the cache key."""

    @abstractmethod
    def _synthesize(self, text: str, lang: str, out: Path) -> None:
        """Write ``text`` spoken in ``lang`` as a WAV file at ``out``."""

    def key(self, text: str, lang: str) -> str:
        text = unicodedata.normalize("NFC", text)
        payload = json.dumps([self.name, self.voice(lang), lang, text], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def render(self, text: str, lang: str = "vi") -> str:
        """Path of a WAV speaking ``text``; rendered only when not cached."""
        text = unicodedata.normalize("NFC", text).strip()
        if not text or len(text) > MAX_TEXT:
            raise TtsError(f"text must be 1–{MAX_TEXT} characters")
        final = self.dir / f"{self.key(text, lang)}.wav"
        if final.exists():
            os.utime(final)  # recently used: kept by prune()
            return str(final)
        tmp = self.dir / f".{final.stem}.{os.urandom(4).hex()}.tmp.wav"
        try:
            self._synthesize(text, lang, tmp)
            _check_wav(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.dir)
        finally:
            tmp.unlink(missing_ok=True)
        return str(final)

    def prune(self, max_files: int = 500) -> int:
        """Delete the least recently used renderings beyond ``max_files``; return how many."""
        files = sorted(self.dir.glob("*.wav"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in files[max_files:]:
            p.unlink(missing_ok=True)
        return max(0, len(files) - max_files)

    def _run(self, argv: list[str], text: str) -> None:
        try:
            proc = subprocess.run(argv, input=text.encode(), capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise TtsError(f"{argv[0]} not found: install it or fix tts settings") from None
        except subprocess.TimeoutExpired:
            raise TtsError(f"{argv[0]} took longer than {self.timeout_s} s") from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            raise TtsError(f"{argv[0]} failed ({proc.returncode}): {err}")


class EspeakEngine(TtsEngine):
    """espeak-ng: robotic but small, fast and everywhere (``apt install espeak-ng``).

    ``voices`` maps a language to an espeak-ng voice (default: the language code itself).
    """

    name = "espeak-ng"

    def __init__(self, cache_dir: str | os.PathLike, *, voices: dict[str, str] | None = None,
                 speed_wpm: int = 150, binary: str = "espeak-ng", timeout_s: float = 120) -> None:
        super().__init__(cache_dir, timeout_s=timeout_s)
        self.voices = dict(voices or {})
        self.speed_wpm = speed_wpm
        self.binary = binary

    def voice(self, lang: str) -> str:
        return f"{self.voices.get(lang, lang)}@{self.speed_wpm}"

    def _synthesize(self, text: str, lang: str, out: Path) -> None:
        voice = self.voices.get(lang, lang)
        # text on stdin: a bulletin starting with "-" is not taken for an option
        self._run([self.binary, "-v", voice, "-s", str(self.speed_wpm), "-w", str(out),
                   "--stdin"], text)


class PiperEngine(TtsEngine):
    """Piper neural voices: one ONNX model per language (``models: {vi: /path/vi.onnx}``)."""

    name = "piper"

    def __init__(self, cache_dir: str | os.PathLike, *, models: dict[str, str],
                 binary: str = "piper", timeout_s: float = 300) -> None:
        super().__init__(cache_dir, timeout_s=timeout_s)
        if not models:
            raise TtsError("piper needs tts.piper.models: {lang: model path}")
        self.models = dict(models)
        self.binary = binary

    def voice(self, lang: str) -> str:
        model = self.models.get(lang)
        if model is None:
            raise TtsError(f"no piper model for language {lang!r} (have {sorted(self.models)})")
        return Path(model).name

    def _synthesize(self, text: str, lang: str, out: Path) -> None:
        model = self.models.get(lang)
        if model is None or not Path(model).is_file():
            raise TtsError(f"piper model for {lang!r} not found: {model}")
        if shutil.which(self.binary) is None:
            raise TtsError(f"piper binary {self.binary!r} not found on PATH")
        self._run([self.binary, "--model", model, "--output_file", str(out)], text)


def make_engine(cfg: dict, cache_dir: str | os.PathLike) -> TtsEngine:
    """Build the engine from the validated ``tts:`` section."""
    engine = cfg.get("engine", "espeak")
    timeout = float(cfg.get("timeout_s", 120))
    if engine == "piper":
        piper = cfg.get("piper") or {}
        return PiperEngine(cache_dir, models=piper.get("models") or {},
                           binary=piper.get("binary", "piper"), timeout_s=timeout)
    if engine == "espeak":
        return EspeakEngine(cache_dir, voices=cfg.get("voices"),
                            speed_wpm=int(cfg.get("speed_wpm", 150)), timeout_s=timeout)
    raise TtsError(f"tts.engine must be espeak or piper, not {engine!r}")


def _check_wav(path: Path) -> None:
    try:
        with wave.open(str(path), "rb") as w:
            frames = w.getnframes()
    except (OSError, wave.Error, EOFError) as e:
        raise TtsError(f"engine wrote no usable WAV: {e}") from None
    if frames == 0:
        raise TtsError("engine wrote an empty WAV")

"""VlcAudio on real libvlc, writing to a WAV file (``--aout=afile``): no sound card needed."""

from __future__ import annotations

import array
import math
import queue
import shutil
import subprocess
import time
import wave
from pathlib import Path

import pytest

from drivers import DriverError
from drivers.audio.base import wav_duration_ms

vlc = pytest.importorskip("vlc")
from drivers.audio.vlc import VlcAudio, alsa_card_present  # noqa: E402

pytestmark = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng needed")

TEXT = "Thông báo khẩn cấp: bão số năm sắp đổ bộ vào đất liền. Bà con chú ý."


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "vi", "-w", str(path), TEXT], check=True)
    return path


class Rec:
    """An audio driver on the afile output plus a queue of the events it reported."""

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path / "out.wav"
        self.events: queue.Queue = queue.Queue()
        self.audio = VlcAudio({"backend": "vlc",
                               "vlc_args": ["--aout=afile", f"--audiofile-file={self.out}"]},
                              lambda kind, detail: self.events.put((kind, detail)))

    def wait_for(self, *kinds: str, timeout: float = 20) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kind, detail = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind in kinds:
                return kind, detail
        raise AssertionError(f"no {kinds} event within {timeout} s")


@pytest.fixture
def rec(tmp_path):
    r = Rec(tmp_path)
    yield r
    r.audio.close()


def rms_dbfs(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        samples = array.array("h", w.readframes(w.getnframes()))
    mean_sq = sum(s * s for s in samples) / max(1, len(samples))
    return 20 * math.log10(max(math.sqrt(mean_sq), 1e-9) / 32768)


def test_plays_a_file_fully_to_the_output(rec, speech) -> None:
    length_ms = wav_duration_ms(str(speech))
    t0 = time.monotonic()
    rec.audio.play(str(speech), volume=90)
    assert rec.audio.is_playing()
    kind, detail = rec.wait_for("ended", "error")
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert kind == "ended" and detail["source"] == str(speech)
    assert not rec.audio.is_playing()
    # "ended" waits for the output to drain, so airtime is about the file's length
    assert elapsed_ms > 0.8 * length_ms
    rec.audio.close()
    out_ms = wav_duration_ms(str(rec.out))
    assert out_ms is not None and abs(out_ms - length_ms) < 300
    assert rms_dbfs(rec.out) > -40  # speech, not silence


def test_stop_returns_position_and_no_end_follows(rec, speech) -> None:
    rec.audio.play(str(speech))
    rec.wait_for("started")
    time.sleep(1.5)
    pos = rec.audio.stop()
    assert 500 <= pos <= 3500
    assert not rec.audio.is_playing() and rec.audio.position_ms() == 0
    time.sleep(0.5)
    assert [k for k, _ in list(rec.events.queue)] in ([], ["started"])


def test_start_position_skips_the_beginning(rec, speech) -> None:
    length_ms = wav_duration_ms(str(speech))
    rec.audio.play(str(speech), start_ms=3000)
    assert rec.wait_for("ended", "error")[0] == "ended"
    rec.audio.close()
    out_ms = wav_duration_ms(str(rec.out))
    assert out_ms is not None and abs(out_ms - (length_ms - 3000)) < 400


def test_corrupt_file_gives_error_then_recovers(rec, speech, tmp_path) -> None:
    bad = tmp_path / "corrupt.mp3"
    bad.write_bytes(bytes((i * 7919) % 251 for i in range(40_000)))
    try:
        rec.audio.play(str(bad))
    except DriverError:
        pass
    else:
        kind, detail = rec.wait_for("ended", "error")
        assert kind == "error" and detail["source"] == str(bad)
    rec.audio.play(str(speech))
    assert rec.wait_for("ended", "error")[0] == "ended"


def test_missing_file_gives_error(rec, tmp_path) -> None:
    missing = tmp_path / "nope.wav"
    rec.audio.play(str(missing))
    kind, _ = rec.wait_for("ended", "error")
    assert kind == "error"


def test_missing_device_raises_driver_error(tmp_path, speech) -> None:
    audio = VlcAudio({"backend": "vlc", "device": "plughw:CARD=NoSuchCard,DEV=0"})
    try:
        assert audio.ok() is False
        with pytest.raises(DriverError):
            audio.play(str(speech))
    finally:
        audio.close()


def test_alsa_card_presence(tmp_path) -> None:
    (tmp_path / "card1").mkdir()
    (tmp_path / "Device").mkdir()
    proc = str(tmp_path)
    assert alsa_card_present("hw:1,0", proc) and not alsa_card_present("hw:2,0", proc)
    assert alsa_card_present("plughw:CARD=Device,DEV=0", proc)
    assert not alsa_card_present("hw:CARD=Other", proc)
    assert alsa_card_present("default", proc)

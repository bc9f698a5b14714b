"""Text-to-speech rendering and its cache, with the real espeak-ng."""

from __future__ import annotations

import os
import shutil
import stat
import wave
from pathlib import Path

import pytest

from agent.audio.tts import EspeakEngine, PiperEngine, TtsError, make_engine

needs_espeak = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng needed")
TEXT = "Xin chào bà con. Đây là thông báo của Ủy ban nhân dân xã."


def frames(path: str) -> int:
    with wave.open(path, "rb") as w:
        return w.getnframes()


@needs_espeak
def test_espeak_renders_a_wav_then_hits_the_cache(tmp_path) -> None:
    engine = EspeakEngine(tmp_path)
    path = engine.render(TEXT, "vi")
    assert frames(path) > 22050 // 2  # more than half a second of speech
    before = os.stat(path).st_ino
    assert engine.render(TEXT, "vi") == path and os.stat(path).st_ino == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(path).name]


@needs_espeak
def test_cache_key_covers_text_lang_and_voice(tmp_path) -> None:
    engine = EspeakEngine(tmp_path)
    a = engine.render(TEXT, "vi")
    assert engine.render(TEXT + " Cảm ơn.", "vi") != a
    assert engine.render("Hello", "en") != engine.render("Hello", "vi")
    assert EspeakEngine(tmp_path, speed_wpm=120).key(TEXT, "vi") != engine.key(TEXT, "vi")


def test_text_is_normalised_before_keying(tmp_path) -> None:
    engine = EspeakEngine(tmp_path)
    decomposed = "Thông báo".replace("ô", "o\u0302")
    assert engine.key(decomposed, "vi") == engine.key("Thông báo", "vi")


def test_failing_engine_leaves_nothing(tmp_path) -> None:
    fake = tmp_path / "fake-espeak"
    fake.write_text("#!/bin/sh\necho 'no voice' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    engine = EspeakEngine(tmp_path / "cache", binary=str(fake))
    with pytest.raises(TtsError, match="no voice"):
        engine.render(TEXT)
    assert list((tmp_path / "cache").iterdir()) == []


def test_engine_writing_garbage_is_refused(tmp_path) -> None:
    fake = tmp_path / "fake-espeak"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "-w" ]; do shift; done\necho junk > "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    engine = EspeakEngine(tmp_path / "cache", binary=str(fake))
    with pytest.raises(TtsError, match="WAV"):
        engine.render(TEXT)
    assert list((tmp_path / "cache").iterdir()) == []


def test_empty_text_is_refused(tmp_path) -> None:
    with pytest.raises(TtsError):
        EspeakEngine(tmp_path).render("   ")


def test_piper_missing_binary_or_model_is_a_clear_error(tmp_path) -> None:
    model = tmp_path / "vi.onnx"
    model.write_bytes(b"x")
    engine = PiperEngine(tmp_path / "c", models={"vi": str(model)}, binary="no-such-piper")
    with pytest.raises(TtsError, match="not found"):
        engine.render(TEXT, "vi")
    with pytest.raises(TtsError, match="no piper model"):
        engine.render(TEXT, "en")
    with pytest.raises(TtsError):
        make_engine({"engine": "piper"}, tmp_path / "c")


def test_make_engine_defaults_to_espeak(tmp_path) -> None:
    assert isinstance(make_engine({}, tmp_path), EspeakEngine)
    with pytest.raises(TtsError):
        make_engine({"engine": "festival"}, tmp_path)

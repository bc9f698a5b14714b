"""The controller's media host (ctl/media.py) and ``locations`` (ctl/config.py)."""

import hashlib
import os

import pytest

from agent.config import ConfigError, load_file
from ctl import config
from ctl.media import MediaError, MediaStore, sniff

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)
OGG = b"OggS\x00\x02" + bytes(64)
MP3_ID3 = b"ID3\x04\x00\x00" + bytes(64)
MP3_FRAME = b"\xff\xfb\x90\x64" + bytes(64)


def test_sniff_reads_the_content_not_the_name():
    assert [sniff(b) for b in (WAV, OGG, MP3_ID3, MP3_FRAME)] == ["wav", "ogg", "mp3", "mp3"]
    assert sniff(b"<html><script>") is None
    assert sniff(b"\x7fELF\x02\x01\x01") is None
    assert sniff(b"\xff\xf9" + bytes(10)) is None     # sync bits but layer 00: not audio


def test_put_stores_once_by_sha256_and_names_the_url(tmp_path):
    store = MediaStore(str(tmp_path), "http://ctl.example:8080/media/")
    m = store.put(WAV)
    sha = hashlib.sha256(WAV).hexdigest()
    assert (m.sha256, m.kind, m.size) == (sha, "wav", len(WAV))
    assert m.url == f"http://ctl.example:8080/media/{sha}.wav"
    assert m.ref("vi") == {"url": m.url, "sha256": sha, "lang": "vi"}
    assert (tmp_path / f"{sha}.wav").read_bytes() == WAV
    assert store.put(WAV) == m
    assert [p for p in os.listdir(tmp_path)] == [f"{sha}.wav"]   # no temporary left
    assert store.path_of(f"{sha}.wav") == str(tmp_path / f"{sha}.wav")


def test_put_refuses_bad_content(tmp_path):
    store = MediaStore(str(tmp_path), "http://h/m", max_bytes=1024)
    with pytest.raises(MediaError) as e:
        store.put(b"#!/bin/sh\nrm -rf /\n" + bytes(20))
    assert e.value.reason == "type"
    with pytest.raises(MediaError) as e:
        store.put(WAV + bytes(2000))
    assert e.value.reason == "size"
    with pytest.raises(MediaError) as e:
        store.put(OGG, sha1="0" * 40)
    assert e.value.reason == "digest"
    assert store.put(OGG, sha1=hashlib.sha1(OGG).hexdigest().upper()).kind == "ogg"
    with pytest.raises(MediaError) as e:
        MediaStore(str(tmp_path), None).put(WAV)
    assert e.value.reason == "config"


def test_path_of_never_leaves_the_folder(tmp_path):
    store = MediaStore(str(tmp_path), "http://h/m")
    for name in ("../etc/passwd", "a" * 64 + ".sh", "A" * 64 + ".wav", "x.wav", ""):
        assert store.path_of(name) is None
    assert store.path_of("a" * 64 + ".wav") is None       # well-formed but absent


def test_locations_checked_and_groups_place_devices(tmp_path):
    good = tmp_path / "ctl.yaml"
    good.write_text("relay: {groups: {phutuc: ['krongpa-phutuc-*']}}\n"
                    "locations: {phutuc: [13.19, 108.69], krongpa-phutuc-c01: [13.2, 108.7]}\n")
    cfg = load_file(str(good), config.CTL_SCHEMA)
    assert config.location_of("krongpa-phutuc-c01", cfg) == (13.2, 108.7)
    assert config.location_of("krongpa-phutuc-c09", cfg) == (13.19, 108.69)
    assert config.location_of("krongpa-chuse-c01", cfg) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("locations: {a: [91, 0], b: [1], c: 'x', d: [true, 1]}\n")
    with pytest.raises(ConfigError) as e:
        load_file(str(bad), config.CTL_SCHEMA)
    text = str(e.value)
    for key in ("locations.a", "locations.b", "locations.c", "locations.d"):
        assert key in text

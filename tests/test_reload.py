"""A SIGHUP reload applies each changed key through a hook or names it as needing a restart
(``Core.on_reload``). ``security.media_hosts`` used to be reported as applied (``security``
applied at once) while the audio service's media cache kept the hosts it copied at start."""

from __future__ import annotations

import copy
import logging

from agent.core.reload import changed_keys, copy_key
from tests.conftest import Keys
from tests.fakes import make_core


def _core(tmp_path):
    core = make_core(tmp_path, trusted_keys={"k1": Keys().public_b64})
    core.link.connect()
    core.run_pending()
    return core


def _reload(core, **changes) -> dict:
    new = copy.deepcopy(core.cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        new[section][key] = value
    core.reload(new)
    core.run_pending()
    return [e for e in core.link.json("/event") if e["type"] == "config"][-1]


def test_a_key_no_hook_applies_is_named_as_needing_a_restart(tmp_path):
    core = _core(tmp_path)
    event = _reload(core, security__media_hosts=["media.example.vn"], mqtt__port=1884,
                    security__max_skew_s=60)
    assert event["result"] == "applied"
    assert event["applied"] == ["security.max_skew_s"]
    assert event["restart_needed"] == ["mqtt.port", "security.media_hosts"]
    # not applied: the running config keeps the old values; applied: the new one
    assert core.cfg["security"]["media_hosts"] == [] and core.cfg["mqtt"]["port"] == 1883
    assert core.cfg["security"]["max_skew_s"] == 60


def test_a_service_hook_applies_its_key(tmp_path):
    """What the audio service registers for its media cache, played by a stand-in."""
    core = _core(tmp_path)
    cache_hosts: list[list[str]] = []
    core.on_reload(("security.media_hosts",),
                   lambda cfg: cache_hosts.append(list(cfg["security"]["media_hosts"])))
    event = _reload(core, security__media_hosts=["media.example.vn"])
    assert cache_hosts == [["media.example.vn"]]
    assert event["applied"] == ["security.media_hosts"] and "restart_needed" not in event
    assert core.cfg["security"]["media_hosts"] == ["media.example.vn"]
    _reload(core, security__max_skew_s=30)  # a reload that does not change it: not called
    assert cache_hosts == [["media.example.vn"]]


def test_a_hook_that_raises_leaves_its_keys_to_a_restart(tmp_path):
    core = _core(tmp_path)

    def broken(cfg):
        raise RuntimeError("cannot apply")

    core.on_reload(("board",), broken)
    event = _reload(core, board__brightness=10, security__max_skew_s=30)
    assert event["applied"] == ["security.max_skew_s"]
    assert event["restart_needed"] == ["board.brightness"]
    assert core.cfg["board"]["brightness"] == 255


def test_the_core_applies_its_own_keys(tmp_path):
    core = _core(tmp_path)
    other = Keys()
    level = logging.getLogger().level
    try:
        event = _reload(core, security__trusted_keys={"k2": other.public_b64},
                        security__replay_memory=500, outbox__max_rows=1000, log__level="error",
                        alerts__raise_after_s=1, health__disk_min_free_mb=50)
        assert logging.getLogger().level == logging.ERROR
    finally:
        logging.getLogger().setLevel(level)
    assert "restart_needed" not in event, event
    assert set(core.inbound.keys) == {"k2"}
    assert core.store.seen_max == 500 and core.store.max_rows == 1000
    assert core.alerts.config.raise_after_s == 1 and core.alerts.config.disk_min_free_mb == 50
    assert core.alerts._thresholds["disk_free_mb"].raise_at == 50


def test_changed_keys_are_leaf_paths_and_copy_in_place():
    old = {"a": {"b": 1, "c": [1]}, "d": None, "_path": "x", "m": {"k.1": "v"}}
    new = {"a": {"b": 1, "c": [2]}, "d": {"pin": 3}, "_path": "y", "m": {"k.1": "w", "k2": "z"}}
    assert changed_keys(old, new) == [("a", "c"), ("d",), ("m", "k.1"), ("m", "k2")]
    inner = old["m"]
    for path in changed_keys(old, new):
        copy_key(old, new, path)
    assert old["m"] is inner and old == {**new, "_path": "x"}


def test_the_audio_service_applies_media_hosts_to_its_cache(tmp_path):
    import pytest

    from agent.audio.media import MediaError
    from agent.audio.service import AudioService

    core = make_core(tmp_path, trusted_keys={"k1": Keys().public_b64},
                     extra={"security": {"media_hosts": ["old.example.vn"]}})
    svc = AudioService(core, core.cfg)
    svc.start()
    core.link.connect()
    core.run_pending()
    try:
        with pytest.raises(MediaError):
            svc.cache.check_url("http://media.example.vn/a.mp3")
        event = _reload(core, security__media_hosts=["media.example.vn"])
        assert event["applied"] == ["security.media_hosts"] and "restart_needed" not in event
        svc.cache.check_url("http://media.example.vn/a.mp3")  # now allowed
        with pytest.raises(MediaError):
            svc.cache.check_url("http://old.example.vn/a.mp3")
    finally:
        svc.close()

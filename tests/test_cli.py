"""``ttcs-agent``'s command line: --config on either side of the command, plain help,
board-preview without a device config, and a status a technician can read."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from agent import cli, config
from agent.status import render_status
from tests.test_config import GOOD


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD)
    return path


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_goes_before_or_after_the_command(good, where, capsys):
    """ttcs-ctl takes --config before the command, ttcs-agent took it only after."""
    argv = ["--config", str(good), "check-config"]
    assert cli.main(argv if where == "before" else argv[2:] + argv[:2]) == 0
    assert capsys.readouterr().out == f"{good}: ok (device krongpa-phutuc-c03)\n"


def test_after_the_command_wins(good, tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "none.yaml"), "check-config", "--config",
                     str(good)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["board-preview", "--help"], ["run", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and "usage: ttcs-agent" in text


def test_board_preview_needs_no_device_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "etc" / "agent.yaml"))
    monkeypatch.delenv("TTCS_AGENT_CONFIG", raising=False)
    out = tmp_path / "b.png"
    assert cli.main(["board-preview", "Họp 19h", "--out", str(out), "--scale", "2"]) == 0
    captured = capsys.readouterr()
    assert "no device config" in captured.err and "default 64x16 board" in captured.err
    assert captured.out.startswith(f"{out}: PNG, 1 frame(s), board 64x16")
    with Image.open(out) as image:
        assert image.size == (128, 32)


def test_board_preview_of_a_scrolling_text_into_a_png_writes_that_png(tmp_path, good, capsys):
    out = tmp_path / "b.png"
    text = "Bão số 3 đổ bộ vào Gia Lai, đề nghị bà con chằng chống nhà cửa"
    assert cli.main(["board-preview", text, "--config", str(good), "--out", str(out),
                     "--scale", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: animated PNG (APNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.yaml", "b.png"]


@pytest.mark.parametrize("scale", ["0", "-3", "33", "x"])
def test_board_preview_refuses_a_bad_scale(scale, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["board-preview", "x", "--scale", scale])
    assert e.value.code == 2
    assert f"argument --scale: must be a whole number 1-32, not '{scale}'" in \
        capsys.readouterr().err


def test_board_preview_refuses_an_unknown_suffix(tmp_path, good, capsys):
    assert cli.main(["board-preview", "x", "--config", str(good), "--out",
                     str(tmp_path / "b.jpg")]) == 2
    assert "the file name must end in .png or .gif" in capsys.readouterr().err


# --- status ---------------------------------------------------------------------------------

def _status(**state) -> dict:
    now = int(time.time() * 1000)
    return {"pid": 1, "written": now,
            "mqtt": {"host": "127.0.0.1", "port": 1883, "connected": True, "last_error": None,
                     "outbox": 0, "protocol": "5", "fallback": None},
            "state": {"device": "c03", "version": "0.1.0", "session": 3,
                      "clock": {"trusted": True, "source": "kernel"}, "alerts": [], **state}}


def test_status_shows_schedule_and_board_readably():
    """They were printed as raw JSON cut off after 300 characters."""
    due = int(time.time() * 1000) + 600_000
    st = _status(
        playing=None, volume=80,
        queue=[{"id": "c-1", "priority": "emergency"}, {"id": "s-2", "at": due},
               {"id": "c-3", "preparing": True}],
        schedule={"revisions": {"dev/c03": 4, "grp/krongpa": 12},
                  "next": {"id": "grp/krongpa:news-am", "due": due, "priority": "normal"},
                  "held": False},
        board={"showing": {"id": "b-7", "text": "Bão số 3 " * 20, "effect": "scroll",
                           "source": "command", "priority": "emergency", "since": due - 600_000},
               "documents": {"grp/krongpa": {"rev": 12, "messages": 3}},
               "queue": [{"id": "b-8", "priority": "normal", "remaining_s": 30.0}],
               "driver": "max7219", "link": False, "brightness": 200, "error": "SPI: gone"})
    text = render_status(st, True)
    lines = text.splitlines()
    assert "queue:    3 waiting: c-1 emergency; s-2 at " in text and "c-3 (being prepared)" in text
    assert "volume:   80" in lines
    assert "schedule: dev/c03 rev 4, grp/krongpa rev 12" in lines
    assert any(ln.startswith("next:     grp/krongpa:news-am normal due ") and " min)" in ln
               for ln in lines)
    assert "board:    max7219, LINK DOWN, brightness 200 (SPI: gone)" in lines
    assert any(ln.startswith('  shows:  "Bão số 3 Bão') and "(command b-7 emergency scroll)" in ln
               for ln in lines)
    assert "  standing: grp/krongpa rev 12 (3 message(s))" in lines
    assert "  queued: b-8 (normal, 30.0 s left)" in lines
    assert "{" not in text and all(len(ln) < 140 for ln in lines)


def test_status_says_the_schedule_is_held_and_the_board_idle():
    text = render_status(_status(schedule={"revisions": {}, "next": None, "held": True},
                                 board={"showing": None, "documents": {}, "queue": [],
                                        "driver": "none", "link": None, "brightness": 255}),
                         True)
    assert "schedule: no documents  HELD: the clock is not trusted" in text
    assert "next:     no scheduled item" in text
    assert "board:    none, no link, brightness 255\n  shows:  nothing" in text

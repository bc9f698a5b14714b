"""drivers: every backend is chosen by name through drivers.REGISTRY, and the config's choices
are the registry's names."""

from __future__ import annotations

import logging

import drivers
from agent import config
from drivers.gpio import RpiGPIO, SimGPIO, open_gpio


def test_config_choices_are_the_registry_names_in_order():
    fields = config.SCHEMA.fields
    assert fields["audio"].fields["backend"].choices == tuple(drivers.REGISTRY["audio"])
    assert fields["board"].fields["driver"].choices == tuple(drivers.REGISTRY["board"])
    assert fields["gpio"].fields["backend"].choices == tuple(drivers.REGISTRY["gpio"])
    assert fields["modem"].fields["backend"].choices == tuple(drivers.REGISTRY["modem"])
    assert fields["verification"].fields["backend"].choices == (
        "none", *drivers.REGISTRY["level"])


def test_every_registered_backend_resolves_to_a_class():
    for kind, names in drivers.REGISTRY.items():
        for name in names:
            assert isinstance(drivers.resolve(kind, name), type), f"{kind}/{name}"


def test_open_gpio_goes_through_the_registry_and_falls_back_to_the_sim(monkeypatch, caplog):
    assert drivers.resolve("gpio", "lgpio") is RpiGPIO
    monkeypatch.setitem(drivers.REGISTRY["gpio"], "sim", "tests.test_drivers:CountingGPIO")
    CountingGPIO.made = 0
    assert isinstance(open_gpio("sim"), CountingGPIO) and CountingGPIO.made == 1
    monkeypatch.setitem(drivers.REGISTRY["gpio"], "lgpio", "tests.test_drivers:MissingGPIO")
    with caplog.at_level(logging.WARNING, logger="drivers.gpio"):
        gpio = open_gpio("lgpio", {"inputs_file": None})
    assert isinstance(gpio, CountingGPIO) and CountingGPIO.made == 2
    assert "gpio backend 'lgpio' unavailable (no GPIO here)" in caplog.text


class CountingGPIO(SimGPIO):
    made = 0

    def __init__(self, options: dict | None = None) -> None:
        super().__init__(options)
        CountingGPIO.made += 1


class MissingGPIO(SimGPIO):
    def __init__(self, options: dict | None = None) -> None:
        raise drivers.DriverUnavailable("no GPIO here")

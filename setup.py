import re
from pathlib import Path

from setuptools import find_packages, setup

# Read, not imported: the build runs isolated, without the package's dependencies.
__version__ = re.search(r'__version__ = "([^"]+)"',
                        (Path(__file__).parent / "agent" / "__init__.py").read_text()).group(1)

setup(
    name="ttcs-agent",
    version=__version__,
    description="Agent for commune IP loudspeaker cabinets and LED information boards",
    python_requires=">=3.11",
    packages=find_packages(include=["agent", "agent.*", "ctl", "ctl.*", "drivers", "drivers.*"]),
    package_data={"ctl": ["schemas/*.xsd", "schemas/README.md", "console/templates/*.html",
                          "console/static/*"]},
    install_requires=[
        "paho-mqtt>=2.0,<3",
        "cryptography>=41",
        "pyyaml>=6",
        "tzdata",
        "requests>=2.28",
        "python-vlc>=3.0",
        "pyserial>=3.5",
        "sounddevice>=0.4",
        "pillow<14",
        "luma.led-matrix>=1.7",
    ],
    extras_require={
        # On a Raspberry Pi: GPIO through lgpio, real SPI for MAX7219 boards.
        "pi": ["rpi-lgpio", "luma.core[spi]"],
        # Controller side extras (relay, reports, the web console of `ttcs-ctl serve`, CAP:
        # schema validation, safe XML, areas; gmqtt: the relay's ingest link, ~4x less CPU per
        # message than paho, docs/SCALE.md; 0.8.x: ctl/relaylink.py overrides one method).
        "ctl": ["gmqtt>=0.8,<0.9", "matplotlib", "rich", "psycopg[binary]", "starlette>=0.37",
                "uvicorn>=0.29", "jinja2>=3.1", "python-multipart>=0.0.9", "argon2-cffi>=23.1",
                "lxml>=5", "defusedxml>=0.7", "shapely>=2", "urllib3>=2"],
        # amqtt: a broker that speaks only MQTT 3.1.1, for the protocol fallback tests.
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff", "aiosmtpd", "amqtt",
                 "selenium>=4.15", "httpx"],
    },
    entry_points={"console_scripts": [
        "ttcs-agent=agent.cli:main",
        "ttcs-ctl=ctl.main:main",
    ]},
)

"""``ttcs-agent doctor``: check the cabinet's parts and say how to fix each problem."""

from __future__ import annotations

import sys

from agent import config


def main(config_path: str | None) -> int:
    try:
        config.load(config_path)
    except config.ConfigError as e:
        for p in e.problems:
            print(f"FAIL config: {p}")
        print("fix: edit the file at the line shown, then run `ttcs-agent check-config`")
        return 1
    print("ok   config", file=sys.stdout)
    return 0

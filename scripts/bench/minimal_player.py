#!/usr/bin/env python3
"""The benchmark's yardstick: the simplest player that does the job, as its own process like
the agent. paho callback → libvlc play → publish "started"; no signature, no storage.

``minimal_player.py PORT OUT.wav [PROTOCOL]`` (MQTT ``5``, the default, or ``3.1.1``: the
version the agent uses in the same run) subscribes to ``bench/base/cmd`` (``{"op": "play",
"id", "path"}`` or ``{"op": "stop"}``), answers on ``bench/base/ack`` and prints ``ready`` once
subscribed. Runs until stdin closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import paho.mqtt.client as mqtt
import vlc
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.mqtt import no_delay


def main() -> int:
    port, out = int(sys.argv[1]), sys.argv[2]
    protocol = mqtt.MQTTv5 if (sys.argv[3:] or ["5"])[0] == "5" else mqtt.MQTTv311
    sys.setswitchinterval(0.001)  # as the agent does
    inst = vlc.Instance(["--no-video", "--quiet", "--aout=afile", f"--audiofile-file={out}"])
    player = inst.media_player_new()

    def on_message(client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        if body["op"] == "play":
            player.set_media(inst.media_new(body["path"]))
            player.play()
            client.publish("bench/base/ack", json.dumps({"id": body["id"]}), qos=1)
        else:
            player.stop()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-baseline",
                         protocol=protocol)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("bench/base/cmd", 1)
    client.on_subscribe = lambda *a: print("ready", flush=True)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    no_delay(client)  # the same transport settings as the agent
    client.loop_start()
    sys.stdin.read()
    player.stop()
    client.loop_stop()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

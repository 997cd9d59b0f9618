"""Print vCPU states and transitions as a vcpu-agent publishes them.

    python examples/subscriber.py [HOST [PORT [PREFIX]]]

A minimal subscriber built on the agent's own payload and topic modules: typed
values in, QoS 1 duplicates dropped by ``seq``. docs/topics.md walks through it.
"""

from __future__ import annotations

import sys

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.payloads import PayloadError, Transition, VcpuStatePayload, decode
from agent.topics import TopicError, parse_topic

HOST = sys.argv[1] if len(sys.argv) > 1 else "localhost"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 1883
PREFIX = sys.argv[3] if len(sys.argv) > 3 else "vcpu"
last_seq: dict[tuple[str, int], int] = {}


def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
    try:
        where = parse_topic(PREFIX, msg.topic)
        body = decode(bytes(msg.payload)) if msg.payload else None  # empty: a cleared topic
    except (TopicError, PayloadError) as err:
        print("ignored:", err, flush=True)
        return
    if isinstance(body, Transition):
        key = (body.uuid, body.vcpu)
        if last_seq.get(key, 0) >= body.seq:
            return  # a QoS 1 duplicate
        last_seq[key] = body.seq
        print(
            f"{where.host} {body.domain} vCPU {body.vcpu}: "
            f"{body.from_state} -> {body.to_state} ({body.source})",
            flush=True,
        )
    elif isinstance(body, VcpuStatePayload):
        print(f"{where.host} {body.domain} vCPU {body.vcpu} is {body.label}", flush=True)


client = mqtt.Client(CallbackAPIVersion.VERSION2)
client.on_message = on_message
client.connect(HOST, PORT)
client.subscribe(f"{PREFIX}/#", qos=1)
client.loop_forever()

"""Eclipse Paho (paho-mqtt, PyPI) exercising MQTT 5.0's retain options, for node/tests/it/mqtt.rs.

MQTT 5.0 over TCP, one connection. It prints "connack <reason code> retain-available <0|1>",
publishes a retained "kept" to --topic, then runs these steps in order, each followed by a
pause in which every message received is printed as "msg <step> <payload> retain=<0|1>":
  rh2       SUBSCRIBE with Retain Handling 2 (no retained messages)
  rh1-new   UNSUBSCRIBE, then SUBSCRIBE with Retain Handling 1 (a new subscription: sent)
  rh1-again SUBSCRIBE again with Retain Handling 1 (it exists: not sent)
  rh0       SUBSCRIBE again with Retain Handling 0 (sent)
  rap1      SUBSCRIBE with Retain As Published and Retain Handling 2, then a retained "live1"
  rap0      SUBSCRIBE without Retain As Published, Retain Handling 2, then a retained "live2"
Exit status 0 when every step ran, 1 otherwise.
"""

import argparse
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--app", required=True)
    a.add_argument("--token", required=True)
    a.add_argument("--client-id", required=True)
    a.add_argument("--topic", required=True)
    a.add_argument("--pause", type=float, default=1.0)
    args = a.parse_args()

    def out(line):
        print(line, flush=True)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(args.app, args.token)
    step = ["connect"]
    connected = []
    acked = set()

    def on_connect(client, userdata, flags, reason_code, properties):
        out(f"connack {reason_code.value} retain-available {getattr(properties, 'RetainAvailable', 1)}")
        connected.append(not reason_code.is_failure)

    def on_message(client, userdata, msg):
        out(f"msg {step[0]} {msg.payload.decode()} retain={int(msg.retain)}")

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        acked.add(mid)

    def on_unsubscribe(client, userdata, mid, reason_codes, properties):
        acked.add(mid)

    def on_publish(client, userdata, mid, reason_code, properties):
        acked.add(mid)

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    c.on_unsubscribe = on_unsubscribe
    c.on_publish = on_publish
    c.connect(args.host, args.port, keepalive=30, clean_start=True)
    c.loop_start()

    def wait(mid):
        deadline = time.time() + 10
        while mid not in acked and time.time() < deadline:
            time.sleep(0.02)
        if mid not in acked:
            out(f"no answer in step {step[0]}")
            c.loop_stop()
            sys.exit(1)

    def subscribe(rh, rap=False):
        opts = SubscribeOptions(qos=1, retainHandling=rh, retainAsPublished=rap)
        _, mid = c.subscribe(args.topic, options=opts)
        wait(mid)

    def publish(payload):
        info = c.publish(args.topic, payload.encode(), qos=1, retain=True)
        wait(info.mid)

    deadline = time.time() + 10
    while not connected and time.time() < deadline:
        time.sleep(0.02)
    if not connected or not connected[0]:
        sys.exit(1)
    publish("kept")
    # A PUBACK means committed at the topic's leader; this node applies the message a moment later
    # and hands it, live, to a subscription made before that (retain=0): let it arrive first.
    time.sleep(args.pause)
    for name, action in [
        ("rh2", lambda: subscribe(SubscribeOptions.RETAIN_DO_NOT_SEND)),
        ("rh1-new", lambda: (wait(c.unsubscribe(args.topic)[1]), subscribe(SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))),
        ("rh1-again", lambda: subscribe(SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)),
        ("rh0", lambda: subscribe(SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)),
        ("rap1", lambda: (subscribe(SubscribeOptions.RETAIN_DO_NOT_SEND, rap=True), publish("live1"))),
        ("rap0", lambda: (subscribe(SubscribeOptions.RETAIN_DO_NOT_SEND, rap=False), publish("live2"))),
    ]:
        step[0] = name
        out(f"step {name}")
        action()
        time.sleep(args.pause)
    c.disconnect()
    c.loop_stop()
    out("done")


if __name__ == "__main__":
    main()

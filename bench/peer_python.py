#!/usr/bin/env python3
"""The Python peer: the store-and-forward script a user might write instead
of hearth, with the same durability promise, to compare backlog drains.

Each reading is one row of an SQLite outbox (WAL, synchronous=FULL); each row
is published as its own MQTT message with QoS 2 over mutual TLS (paho-mqtt)
and deleted, in its own committed transaction, once paho reports the
exchange complete (`on_publish`, which for QoS 2 fires on PUBCOMP). Like a
careful user it keeps at most paho's default of 20 messages in flight
(more would queue unboundedly in paho, and past 65,535 queued messages paho's
message ids wrap onto ones still queued).

    peer_python.py fill  --db FILE --count N
        puts N readings in the outbox in one transaction (the backlog that
        built up while the broker was away; not timed).
    peer_python.py drain --db FILE --host H --port P --cafile CA
                         --cert CRT --key KEY --topic T
        publishes every row and exits once the outbox is empty.

Works with paho-mqtt 1.x and 2.x (callback API version 2 where it exists).
"""

import argparse
import json
import sqlite3
import sys
import threading

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    priority TEXT NOT NULL,
    device_time TEXT NOT NULL,
    received_at TEXT NOT NULL
)
"""

KINDS = [
    ("heart_rate", 72.0, "bpm"),
    ("battery_voltage", 2.95, "V"),
    ("lead_impedance", 540.0, "ohm"),
    ("pacing_percent", 12.5, "%"),
    ("af_burden", 3.2, "%"),
]


def open_db(path):
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(SCHEMA)
    db.commit()
    return db


def fill(args):
    db = open_db(args.db)
    rows = []
    for seq in range(1, args.count + 1):
        kind, value, unit = KINDS[seq % len(KINDS)]
        rows.append(("ICD-PY", seq, kind, value, unit, "routine",
                     "2026-12-01T08:30:00.000Z", "2026-12-01T08:30:00.412Z"))
    with db:
        db.executemany(
            "INSERT INTO outbox (device, seq, kind, value, unit, priority, device_time, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    print(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def drain(args):
    import paho.mqtt.client as mqtt

    db = open_db(args.db)
    db_lock = threading.Lock()
    in_flight = threading.BoundedSemaphore(20)
    connected = threading.Event()
    lock = threading.Lock()
    pending = {}  # mid -> row id
    done_early = set()  # mids whose PUBCOMP came before publish() returned
    left = [db.execute("SELECT count(*) FROM outbox").fetchone()[0]]
    empty = threading.Event()
    if left[0] == 0:
        empty.set()

    def delete(row_id):
        with db_lock:
            db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            db.commit()
        in_flight.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                empty.set()

    def on_connect(client, userdata, flags, rc, *rest):
        connected.set()

    def on_publish(client, userdata, mid, *rest):
        with lock:
            row_id = pending.pop(mid, None)
            if row_id is None:
                done_early.add(mid)
                return
        delete(row_id)

    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="peer-python",
                             clean_session=False)
    else:
        client = mqtt.Client(client_id="peer-python", clean_session=False)
    client.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        sys.exit("peer_python: no CONNACK within 10 s")

    with db_lock:
        rows = db.execute(
            "SELECT id, device, seq, kind, value, unit, priority, device_time, received_at"
            " FROM outbox ORDER BY id").fetchall()
    for row_id, device, seq, kind, value, unit, priority, device_time, received_at in rows:
        payload = json.dumps({
            "id": "peer/%s/%d" % (device, seq), "device": device, "seq": seq,
            "kind": kind, "value": value, "unit": unit, "priority": priority,
            "device_time": device_time, "received_at": received_at,
        }, separators=(",", ":"))
        in_flight.acquire()
        info = client.publish(args.topic, payload, qos=2)
        with lock:
            if info.mid in done_early:
                done_early.discard(info.mid)
                early = True
            else:
                pending[info.mid] = row_id
                early = False
        if early:
            delete(row_id)
    if not empty.wait(600):
        sys.exit("peer_python: outbox not empty after 600 s")
    client.disconnect()
    client.loop_stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fill")
    f.add_argument("--db", required=True)
    f.add_argument("--count", type=int, required=True)
    d = sub.add_parser("drain")
    d.add_argument("--db", required=True)
    for a in ("--host", "--cafile", "--cert", "--key", "--topic"):
        d.add_argument(a, required=True)
    d.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    fill(args) if args.mode == "fill" else drain(args)


if __name__ == "__main__":
    main()

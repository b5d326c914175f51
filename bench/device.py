#!/usr/bin/env python3
"""A bedside device for the benchmark: owns a pseudo-terminal for its whole
life and speaks protocol v1.1 (docs/serial-protocol.md) on it.

    device.py --link PATH

It makes a pty pair, puts the slave in raw mode, keeps the slave open (so
that its number stays taken while hearth stops and starts) and points the
symlink PATH at it: hearth's `serial.port` is PATH. It then prints
`{"event": "ready", "pty": ...}` and takes one JSON command per line on
stdin, answering each with one JSON line on stdout:

    {"cmd": "burst", "device": D, "count": N, "window": W}
        N routine readings as fast as ACKs allow, at most W unanswered:
        the ingest rate (frames/s) and each frame's write-to-ACK latency.
    {"cmd": "paced", "device": D, "count": N, "interval": S, "priority": P}
        one reading every S seconds (on a fixed schedule, not after each
        ACK): the wall-clock time each frame was written (for end-to-end
        latency at the subscriber) and its ACK latency.
    {"cmd": "quit"}   (or end of stdin): remove PATH, close the pty.

A NAK naming a seq makes the frame go again at once; a frame unanswered for
ACK_TIMEOUT goes again (protocol section 5, rules 5 and 6). Both are
counted: in a clean benchmark they stay at 0.
"""

import argparse
import binascii
import json
import math
import os
import sys
import threading
import time
import tty
from datetime import datetime, timezone

ACK_TIMEOUT = 5.0

ROUTINE = [
    ("heart_rate", "72", "bpm"),
    ("battery_voltage", "2.95", "V"),
    ("lead_impedance", "540", "ohm"),
    ("pacing_percent", "12.5", "%"),
    ("af_burden", "3.2", "%"),
]
ALERTS = [
    ("episode", "42", "s", "AF"),
    ("shock_delivered", "35", "J", None),
]


def crc(body: bytes) -> str:
    return "%04X" % binascii.crc_hqx(body, 0xFFFF)


def now_rfc3339() -> str:
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)


def reading_frame(device: str, seq: int, priority: str) -> bytes:
    if priority == "alert":
        kind, value, unit, detail = ALERTS[seq % len(ALERTS)]
    else:
        kind, value, unit = ROUTINE[seq % len(ROUTINE)]
        detail = None
    fields = ["R", device, str(seq), now_rfc3339(), kind, value, unit, priority]
    if detail:
        fields.append(detail)
    body = ",".join(fields).encode()
    return b"$" + body + b"*" + crc(body).encode() + b"\r\n"


def pct(values, p):
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


class Line:
    """The pty's master side: a reader thread matches answers to frames."""

    def __init__(self, link: str):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing, before hearth opens it
        self.pty = os.ttyname(self.slave)
        tmp = link + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(self.pty, tmp)
        os.replace(tmp, link)
        self.link = link
        self.cv = threading.Condition()
        # (device, seq) -> [frame, first write (perf_counter), last write, wall time]
        self.open = {}
        self.acked = {}  # (device, seq) -> ACK latency in seconds
        self.naks = 0
        self.busy = 0
        self.resent = 0
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def close(self):
        try:
            os.unlink(self.link)
        except FileNotFoundError:
            pass
        self.closed = True
        os.close(self.slave)
        os.close(self.master)

    def send(self, device, seq, frame):
        t = time.perf_counter()
        wall = time.time()
        with self.cv:
            self.open[(device, seq)] = [frame, t, t, wall]
        os.write(self.master, frame)
        return wall

    def _resend(self, key):
        with self.cv:
            entry = self.open.get(key)
            if entry is None:
                return
            entry[2] = time.perf_counter()
            self.resent += 1
            frame = entry[0]
        os.write(self.master, frame)

    def _read(self):
        buf = b""
        while not self.closed:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            t = time.perf_counter()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            resend = []
            with self.cv:
                for line in lines:
                    line = line.strip()
                    if not line.startswith(b"$") or b"*" not in line:
                        continue
                    body, _, check = line[1:].partition(b"*")
                    if crc(body) != check.decode(errors="replace").upper():
                        continue
                    f = body.decode().split(",")
                    if f[0] == "A" and len(f) == 3:
                        key = (f[1], int(f[2].split(":")[-1]))
                        entry = self.open.pop(key, None)
                        if entry is not None:
                            self.acked[key] = t - entry[1]
                    elif f[0] == "N":
                        self.naks += 1
                        if f[2]:
                            resend.append((f[1], int(f[2].split(":")[-1])))
                    elif f[0] == "B":
                        self.busy += 1
                self.cv.notify_all()
            for key in resend:
                self._resend(key)

    def wait_room(self, window):
        """Blocks until fewer than `window` frames are unanswered; resends
        those that waited longer than ACK_TIMEOUT."""
        with self.cv:
            while len(self.open) >= window:
                self.cv.wait(0.5)
                self._check_timeouts_locked()

    def wait_all(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.open:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(min(left, 0.5))
                self._check_timeouts_locked()
        return True

    def _check_timeouts_locked(self):
        now = time.perf_counter()
        late = [k for k, e in self.open.items() if now - e[2] > ACK_TIMEOUT]
        if late:
            threading.Thread(target=lambda: [self._resend(k) for k in late], daemon=True).start()

    def reset_counters(self):
        with self.cv:
            self.acked = {}
            self.naks = self.busy = self.resent = 0


def burst(line, device, count, window, start_seq=1):
    line.reset_counters()
    lengths = 0
    t0 = time.perf_counter()
    for seq in range(start_seq, start_seq + count):
        line.wait_room(window)
        frame = reading_frame(device, seq, "routine")
        lengths += len(frame)
        line.send(device, seq, frame)
    ok = line.wait_all(120)
    elapsed = time.perf_counter() - t0
    lat = list(line.acked.values())
    return {
        "event": "done",
        "complete": ok,
        "count": count,
        "acked": len(lat),
        "elapsed": elapsed,
        "rate": len(lat) / elapsed if elapsed > 0 else None,
        "ack_p50": pct(lat, 50),
        "ack_p99": pct(lat, 99),
        "ack_max": max(lat) if lat else None,
        "mean_frame_bytes": lengths / count if count else None,
        "naks": line.naks,
        "busy": line.busy,
        "resent": line.resent,
    }


def paced(line, device, count, interval, priority, start_seq=1):
    line.reset_counters()
    sent = {}
    t0 = time.perf_counter()
    for i in range(count):
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # the schedule itself, not a wait for a condition
        seq = start_seq + i
        sent[seq] = line.send(device, seq, reading_frame(device, seq, priority))
    ok = line.wait_all(60)
    lat = list(line.acked.values())
    return {
        "event": "done",
        "complete": ok,
        "count": count,
        "acked": len(lat),
        "sent": sent,
        "ack_p50": pct(lat, 50),
        "ack_p99": pct(lat, 99),
        "ack_max": max(lat) if lat else None,
        "naks": line.naks,
        "busy": line.busy,
        "resent": line.resent,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--link", required=True)
    args = ap.parse_args()
    line = Line(args.link)
    out = sys.stdout

    def say(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"event": "ready", "pty": line.pty})
    try:
        for raw in sys.stdin:
            cmd = json.loads(raw)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "burst":
                say(burst(line, cmd["device"], cmd["count"], cmd.get("window", 8),
                          cmd.get("start_seq", 1)))
            elif cmd["cmd"] == "paced":
                say(paced(line, cmd["device"], cmd["count"], cmd["interval"],
                          cmd.get("priority", "routine"), cmd.get("start_seq", 1)))
            else:
                say({"event": "error", "message": "unknown command %r" % cmd["cmd"]})
    finally:
        line.close()


if __name__ == "__main__":
    main()

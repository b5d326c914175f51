"""The table of a benchmark run, and docs/performance.md (newest on top)."""

import os
import platform
import subprocess

from parts import CLK_TCK, mosquitto_bin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The 115,200-baud line the ingest target is measured against: 8N1 is 10 bits a byte.
LINE_BAUD = 115_200
BITS_PER_BYTE = 10


def fmt_int(x):
    return "{:,}".format(int(round(x)))


def ms(x):
    return "%.2f ms" % (x * 1e3) if x is not None else "–"


def ratio(a, b):
    return a / b if a is not None and b else None


def met(ok):
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def table(b):
    r = b.r
    a = b.a
    failed = r.get("failed", {})
    rows = []

    def drain(key):
        return r.get("drain_" + key)

    def rate(key):
        d = drain(key)
        return d["rate"] if d else None

    def rate_cell(key, extra=""):
        d = drain(key)
        if not d:
            return "failed (see the log)" if any(key in f for f in failed) else "n/a"
        return "%s readings/s (%.2f s%s)" % (fmt_int(d["rate"]), d["secs"], extra)

    mp, py, bat, b1 = rate("mosquitto_pub"), rate("python"), rate("batched"), rate("batch1")
    rb_mp, rb_py, r1_mp = ratio(bat, mp), ratio(bat, py), ratio(b1, mp)
    bd = drain("batched")
    rows.append(("Backlog drain, hearth batched (default config)",
                 rate_cell("batched", ", %s messages" % fmt_int(bd["messages"]) if bd else ""),
                 "%s mosquitto_pub, %s Python" % (
                     "%.1f×" % rb_mp if rb_mp else "–", "%.1f×" % rb_py if rb_py else "–"),
                 "≥5× mosquitto_pub, ≥10× Python",
                 met(None if rb_mp is None or rb_py is None else rb_mp >= 5 and rb_py >= 10)))
    rows.append(("Backlog drain, hearth `batch_max_readings = 1`", rate_cell("batch1"),
                 "%.2f× mosquitto_pub" % r1_mp if r1_mp else "–", "≥0.8× mosquitto_pub",
                 met(None if r1_mp is None else r1_mp >= 0.8)))
    if b.cbor:
        rc = ratio(rate("cbor"), mp)
        rows.append(("Backlog drain, hearth `encoding = \"cbor\"`", rate_cell("cbor"),
                     "%.1f× mosquitto_pub" % rc if rc else "–", "(as batched)", "n/a"))
    else:
        rows.append(("Backlog drain, hearth `encoding = \"cbor\"`",
                     "n/a (not in this build)", "–", "–", "n/a"))
    mpd = drain("mosquitto_pub") or {}
    lost = ("; delivered %s of %s: it exits at the end of its input with messages "
            "in flight, which are lost (it persists nothing)"
            % (fmt_int(mpd["received"]), fmt_int(mpd["n"]))
            if mpd.get("received") is not None and mpd["received"] < mpd["n"] else "")
    rows.append(("Backlog drain, `mosquitto_pub -q 2 -l` (1 message/reading)",
                 rate_cell("mosquitto_pub", lost), "reference", "–", "–"))
    rows.append(("Backlog drain, Python paho + sqlite3 (`bench/peer_python.py`)",
                 rate_cell("python"), "reference", "–", "–"))

    ing = r.get("ingest")
    if ing:
        frame_len = ing["mean_frame_bytes"]
        line_rate = LINE_BAUD / BITS_PER_BYTE / frame_len
        ri = ing["rate"] / line_rate
        rows.append(("Ingest, pty → committed → ACK (window %d, broker away)" % a.window,
                     "%s frames/s" % fmt_int(ing["rate"]),
                     "%.1f× the %.0f frames/s of a 115,200-baud line (%.0f-byte frames, 8N1)"
                     % (ri, line_rate, frame_len), "≥50×", met(ri >= 50)))
        rows.append(("ACK latency at full ingest (window %d)" % a.window,
                     "p50 %s, p99 %s" % (ms(ing["ack_p50"]), ms(ing["ack_p99"])), "–", "–", "–"))
    e2e = r.get("e2e")
    if e2e:
        rows.append(("ACK latency at 10 readings/s",
                     "p50 %s, p99 %s" % (ms(e2e["ack_p50"]), ms(e2e["ack_p99"])), "–", "–", "–"))
        rows.append(("End to end at 10 readings/s (frame written → subscriber, %d readings)"
                     % e2e["count"], "p50 %s, p99 %s" % (ms(e2e["p50"]), ms(e2e["p99"])),
                     "max %s" % ms(e2e["max"]), "p99 <10 ms", met(e2e["p99"] < 0.010)))
    al = drain("alerts")
    if al:
        rows.append(("Alert latency during the backlog drain (%d alerts, every %.0f ms)"
                     % (al["alerts"], al["alert_interval"] * 1e3),
                     "p50 %s, p99 %s" % (ms(al["alert_p50"]), ms(al["alert_p99"])),
                     "%d of %d arrived before the backlog was through" % (
                         al["alerts_during"], al["alerts"]),
                     "p99 <10 ms", met(al["alert_p99"] < 0.010)))
    idle = r.get("idle")
    if idle:
        rows.append(("RSS, steady (VmRSS, idle after the live phase)",
                     "%.1f MiB" % (idle["rss"] / 2**20),
                     "peak (VmHWM): %.1f MiB filling, %.1f MiB draining, %.1f MiB live" % (
                         r.get("fill_hwm", 0) / 2**20, (bd or {}).get("hwm", 0) / 2**20,
                         idle["hwm"] / 2**20),
                     "<16 MB", met(idle["rss"] < 16e6)))
        rows.append(("CPU at idle (%.0f s, connected, no readings)" % idle["secs"],
                     "%.3f %%" % idle["cpu_pct"],
                     "%d ticks of 1/%d s (one tick = %.3f %% here); disk writes %s bytes/s"
                     % (idle["ticks"], CLK_TCK, idle["tick_pct"],
                        fmt_int(idle["write_bytes"] / idle["secs"])),
                     "<0.1 %", met(idle["cpu_pct"] < 0.1)))
    if ing and bd:
        per = (r["fill_write_bytes"] + bd["write_bytes"]) / a.n
        rows.append(("Disk writes per reading, full speed (store + deliver)",
                     "%s bytes" % fmt_int(per),
                     "%s store + %s deliver" % (fmt_int(r["fill_write_bytes"] / a.n),
                                                fmt_int(bd["write_bytes"] / a.n)), "–", "–"))
    slow = r.get("slow")
    if slow:
        rows.append(("Disk writes per reading, 1 reading/s (%d readings, delivered)"
                     % slow["count"], "%s bytes" % fmt_int(slow["write_bytes"] / slow["count"]),
                     "–", "–", "–"))
    wire = drain("wire")
    if wire:
        tot = wire["wire"]["up"] + wire["wire"]["down"]
        rows.append(("Wire bytes per reading, batched JSON drain (TLS, both ways)",
                     "%.1f bytes" % (tot / a.n), "%.1f up, %.1f down" % (
                         wire["wire"]["up"] / a.n, wire["wire"]["down"] / a.n),
                     "(≤40 is for compact)", "n/a"))
    wc = drain("wire_cbor")
    if b.cbor and wc:
        tot = wc["wire"]["up"] + wc["wire"]["down"]
        rows.append(("Wire bytes per reading, compact (cbor) drain", "%.1f bytes" % (tot / a.n),
                     "–", "≤40", met(tot / a.n <= 40)))
    else:
        rows.append(("Wire bytes per reading, compact (cbor) drain",
                     "n/a (not in this build)" if not b.cbor else "failed", "–", "≤40", "n/a"))
    size = os.path.getsize(a.stripped)
    rows.append(("Stripped binary (%s)" % a.build_desc, "%.2f MiB" % (size / 2**20),
                 "%s bytes" % fmt_int(size), "–", "–"))

    out = ["| Measure | Result | Beside it (same run) | Target | Met |",
           "|---|---|---|---|---|"]
    out += ["| %s |" % " | ".join(row) for row in rows]
    return "\n".join(out)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "nproc %d, %s, Linux %s" % (os.cpu_count(), model, platform.release())


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def git(*args):
    try:
        return subprocess.run(["git", "-C", REPO] + list(args), capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def versions(a):
    def first(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    mosq = first([mosquitto_bin(), "-h"]).replace("mosquitto version ", "")
    paho = first([a.python, "-c", "import paho.mqtt as m; print(m.__version__)"])
    hv = first([a.hearth, "--version"])
    return ("%s (%s), mosquitto %s, paho-mqtt %s, Python %s"
            % (hv, a.build_desc, mosq, paho, first([a.python, "-c",
                                                    "import platform; print(platform.python_version())"])))


DOC_HEAD = """# Performance

`bench/run.sh` measures hearth against its peers in one run: the same local
mosquitto 2.0 (started by the script on a free 127.0.0.1 port, mutual-TLS
listener with throwaway openssl certificates, `require_certificate true`,
persistence off, no queue limits) with a QoS 2 `mosquitto_sub` attached that
counts what arrives. A backlog of N readings is stored by hearth with its
broker away and copied, so every hearth drain starts from the same store;
drain time runs from the publisher's start to the subscriber's receipt of
the N-th reading. The peers are `mosquitto_pub -q 2 -l` (one message per
reading) and `bench/peer_python.py` (paho-mqtt + sqlite3 in WAL with
`synchronous=FULL`, one row per reading, deleted on PUBCOMP). Frames are
written and ACKs read on a pty by `bench/device.py`; wire bytes are counted by
`bench/proxy.py` between hearth and mosquitto. `bench/run.sh --quick` uses
10,000 readings and short windows (for development); the default uses
100,000 readings, 60 s windows. `bench/run.sh --help` lists the options.

Newest run first; older tables are kept below.

<!-- bench/run.sh inserts each new run below this line -->
"""
MARK = "<!-- bench/run.sh inserts each new run below this line -->"


def write_doc(b, tbl, header, notes):
    path = os.path.join(REPO, "docs", "performance.md")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = DOC_HEAD
    if MARK not in text:
        text = DOC_HEAD + "\n" + text
    entry = header + "\n\n" + tbl + "\n" + ("\n" + notes + "\n" if notes else "")
    head, _, rest = text.partition(MARK)
    text = head + MARK + "\n\n" + entry
    if rest.strip():
        text += "\n" + rest.lstrip("\n")
    with open(path, "w") as f:
        f.write(text)
    return path

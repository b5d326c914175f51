#!/usr/bin/env python3
"""hearth's benchmark (issue 9, part 5); run it with `bench/run.sh`.

Everything runs against one kind of broker, a local mosquitto started here on
a free 127.0.0.1 port with a mutual-TLS listener (`require_certificate
true`, throwaway certificates from `bench/make-certs.sh`), persistence off
and unlimited queues, with a QoS 2 subscriber (`mosquitto_sub`) attached that
counts what arrives. Each drain gets a fresh broker and subscriber.

Phases, in order:
  1. fill/ingest   hearth runs with its broker port closed; `bench/device.py`
                   sends N routine readings on a pty (window 8): frames/s
                   and ACK latency. The store is then stopped and copied:
                   every hearth drain below starts from that same backlog.
  2. drains        hearth batched (default config), batch size 1, compact
                   encoding (`mqtt.encoding = "cbor"`, if this build knows
                   the key), `mosquitto_pub -q 2 -l`, `bench/peer_python.py`:
                   time from the publisher's start until the subscriber
                   has all N readings.
  3. alerts        the batched drain again, with ~20 alerts sent on the
                   serial line while the backlog drains: frame written to
                   subscriber receipt.
  4. wire          the batched drain again through `bench/proxy.py`: bytes
                   on the TCP connection (both ways) per reading.
  5. live          hearth connected: 10 readings/s end to end, 1 reading/s
                   for disk bytes per reading, then idle CPU and RSS.

The table goes to stdout and, unless --no-docs, on top of
docs/performance.md. Progress goes to stderr.
"""

import argparse
import atexit
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GATEWAY = "gw-bench"
START = time.monotonic()
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Device ids, one per phase, so that every phase's device starts its own count.
FILL_DEVICE = "ICD-0042"
ALERT_DEVICE = "ICD-ALERT"
E2E_DEVICE = "ICD-E2E"
SLOW_DEVICE = "ICD-SLOW"

# The 115,200-baud line the ingest target is measured against: 8N1 is 10 bits a byte.
LINE_BAUD = 115_200
BITS_PER_BYTE = 10


def progress(msg):
    print("[bench %7.1fs] %s" % (time.monotonic() - START, msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- processes

CHILDREN = []


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    CHILDREN.append(p)
    return p


def stop_proc(p, timeout=20.0, sig=signal.SIGTERM):
    """Signals one child we started and waits for it (SIGKILL after `timeout`)."""
    if p is None:
        return None
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass
    return p.returncode


def cleanup():
    for p in reversed(CHILDREN):
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass


def on_signal(signum, _frame):
    progress("signal %d: stopping every process this run started" % signum)
    sys.exit(128 + signum)


def wait_for(pred, timeout, what, interval=0.02):
    """Polls `pred` (for conditions that send no event) until it returns a
    true value, which is returned; raises BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise BenchError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def proc_cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def proc_write_bytes(pid):
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------- the parts

class Certs:
    def __init__(self, d):
        self.dir = d
        for name in ("ca", "server", "gateway", "hospital", "peer"):
            setattr(self, name + "_crt", os.path.join(d, name + ".crt"))
            setattr(self, name + "_key", os.path.join(d, name + ".key"))

    def client_args(self, who):
        return ["--cafile", self.ca_crt, "--cert", getattr(self, who + "_crt"),
                "--key", getattr(self, who + "_key")]


def mosquitto_bin():
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/usr/local/sbin"]:
        p = os.path.join(d, "mosquitto")
        if d and os.path.isfile(p):
            return p
    return "mosquitto"


class Broker:
    """mosquitto on a free 127.0.0.1 port, mutual TLS, persistence off."""

    def __init__(self, work, certs, name):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.certs = certs
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        self.log = os.path.join(self.dir, "mosquitto.log")
        self.proc = None
        self.port = None

    def _write_conf(self):
        with open(self.conf, "w") as f:
            f.write(
                "# Written by bench/bench.py.\n"
                "user root\n"
                "allow_anonymous false\n"
                "persistence false\n"
                "# 0 = no limit: nothing queued for the subscriber is dropped.\n"
                "max_queued_messages 0\n"
                "max_queued_bytes 0\n"
                "log_dest file %s\n"
                "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                "listener %d 127.0.0.1\n"
                "cafile %s\ncertfile %s\nkeyfile %s\n"
                "require_certificate true\n"
                "use_identity_as_username true\n"
                % (self.log, self.port, self.certs.ca_crt, self.certs.server_crt,
                   self.certs.server_key))

    def _log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self):
        for _ in range(5):
            self.port = free_port()
            self._write_conf()
            runs_before = self._log_text().count(" running\n")
            err = open(os.path.join(self.dir, "mosquitto.stderr"), "a")
            self.proc = spawn([mosquitto_bin(), "-c", self.conf], stdin=subprocess.DEVNULL,
                              stdout=err, stderr=err)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._log_text().count(" running\n") > runs_before:
                    try:
                        socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                        return self
                    except OSError:
                        pass
                time.sleep(0.01)
            stop_proc(self.proc)
            if "Address already in use" not in self._log_text():
                raise BenchError("mosquitto did not start:\n" + self._log_text()[-2000:])
        raise BenchError("mosquitto found no free port in 5 attempts")

    def stop(self):
        stop_proc(self.proc)
        self.proc = None


class Subscriber:
    """`mosquitto_sub -q 2` on every topic a run publishes to; a reader
    thread counts readings per topic class as lines arrive. Arrival times
    are mosquitto_sub's own (`%U`), taken when it got each message."""

    def __init__(self, broker, certs, errlog):
        self.broker = broker
        self.cv = threading.Condition()
        self.counts = {}
        self.msgs = {}
        self.last_ts = {}
        self.unknown = set()  # classes whose payloads could not be counted
        self.targets = {}  # (cls, n) -> arrival time of the message that reached n
        self.track = []  # id prefixes (bytes) whose arrival times are kept
        self.arrivals = {}  # reading id -> first arrival time
        self.duplicates = 0
        self.proc = spawn(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port)]
            + certs.client_args("hospital")
            + ["-i", "bench-sub", "-q", "2",
               "-t", "hearth/v1/+/readings", "-t", "hearth/v1/+/alerts",
               "-t", "bench/+/readings", "-t", "bench/probe",
               "-F", "%U %t %x"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(errlog, "a"))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self._ready(certs)

    @staticmethod
    def classify(topic):
        parts = topic.split("/")
        if topic == "bench/probe":
            return "probe"
        if parts[0] == "bench":
            return "peer:" + parts[1]
        return parts[-1]  # "readings" or "alerts"

    def _read(self):
        for line in self.proc.stdout:
            try:
                ts_s, topic, hx = line.rstrip(b"\n").split(b" ", 2)
                ts = float(ts_s)
                payload = bytes.fromhex(hx.decode())
            except ValueError:
                continue
            cls = self.classify(topic.decode())
            if cls.startswith("peer:") or cls == "probe":
                n = 1
            elif payload[:1] == b"{":
                n = payload.count(b'"id":')
            else:
                n = 1  # not JSON (compact encoding): counted per message only
                self.unknown.add(cls)
            tracked = None
            if self.track and any(p in payload for p in self.track):
                try:
                    tracked = [r["id"] for r in json.loads(payload)["readings"]]
                except (ValueError, KeyError, TypeError):
                    tracked = None
            with self.cv:
                before = self.counts.get(cls, 0)
                self.counts[cls] = before + n
                self.msgs[cls] = self.msgs.get(cls, 0) + 1
                self.last_ts[cls] = ts
                for (c, target) in self.targets:
                    if c == cls and before < target <= before + n:
                        self.targets[(c, target)] = ts
                for rid in tracked or ():
                    if rid in self.arrivals:
                        self.duplicates += 1
                    else:
                        self.arrivals[rid] = ts
                self.cv.notify_all()

    def _ready(self, certs):
        """Publishes probes until one comes back: the subscription is live."""
        for _ in range(20):
            before = self.count("probe")
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.broker.port)]
                           + certs.client_args("peer")
                           + ["-q", "1", "-t", "bench/probe", "-m", "probe"],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10)
            with self.cv:
                if self.cv.wait_for(lambda: self.counts.get("probe", 0) > before, 0.5):
                    return
            if self.proc.poll() is not None:
                raise BenchError("mosquitto_sub exited with %s" % self.proc.returncode)
        raise BenchError("the subscriber saw none of 20 probes")

    def count(self, cls):
        with self.cv:
            return self.counts.get(cls, 0)

    def expect(self, cls, n):
        """Registers `n` before the run starts, so the arrival time of the
        message that brings the count to `n` is kept."""
        with self.cv:
            self.targets[(cls, n)] = None

    def wait_count(self, cls, n, timeout):
        """Waits (on the reader's events) for `n` readings of `cls`; returns
        the arrival time of the one that made `n`."""
        with self.cv:
            self.targets.setdefault((cls, n), None)
            ok = self.cv.wait_for(lambda: self.counts.get(cls, 0) >= n, timeout)
            if not ok:
                raise BenchError("subscriber has %d of %d on `%s` after %.0f s"
                                 % (self.counts.get(cls, 0), n, cls, timeout))
            return self.targets[(cls, n)] or self.last_ts[cls]

    def wait_arrivals(self, ids, timeout):
        with self.cv:
            ok = self.cv.wait_for(lambda: all(i in self.arrivals for i in ids), timeout)
            if not ok:
                missing = [i for i in ids if i not in self.arrivals]
                raise BenchError("%d of %d tracked readings never arrived (first: %s)"
                                 % (len(missing), len(ids), missing[0]))
            return {i: self.arrivals[i] for i in ids}

    def stop(self):
        stop_proc(self.proc)


class World:
    """A fresh broker with the subscriber attached, for one phase."""

    def __init__(self, work, certs, name):
        self.broker = Broker(work, certs, name).start()
        self.sub = Subscriber(self.broker, certs, os.path.join(self.broker.dir, "sub.stderr"))

    def close(self):
        self.sub.stop()
        self.broker.stop()


class Device:
    """`bench/device.py`: a pty it owns for the whole run, behind `link`."""

    def __init__(self, python, link):
        self.proc = spawn([python, os.path.join(HERE, "device.py"), "--link", link],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._next(10)
        self.pty = ready["pty"]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, timeout):
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError("the device answered nothing within %.0f s" % timeout)
        if msg is None:
            raise BenchError("the device exited (%s)" % self.proc.poll())
        return msg

    def run(self, cmd, timeout):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._next(timeout)

    def start(self, cmd):
        """Sends a command without waiting: `result` collects its answer."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout):
        return self._next(timeout)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        stop_proc(self.proc, timeout=5)


class Hearth:
    """One `hearth run` process, its stderr in its own log file."""

    def __init__(self, binary, config, log):
        self.binary, self.config, self.log = binary, config, log
        env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "HEARTH_CONFIG")}
        self.started = time.time()
        self.proc = spawn([binary, "run", "--config", config], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=open(log, "a"), env=env)
        self.pid = self.proc.pid

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_log(self, needle, timeout):
        def seen():
            if self.proc.poll() is not None:
                raise BenchError("hearth exited (%s):\n%s" % (self.proc.returncode,
                                                              self.log_text()[-3000:]))
            return needle in self.log_text()
        wait_for(seen, timeout, "`%s` in %s" % (needle, self.log), interval=0.01)

    def status(self):
        out = subprocess.run([self.binary, "status", "--format", "json", "--config", self.config],
                             capture_output=True, text=True, timeout=30)
        if out.returncode not in (0, 1):
            raise BenchError("hearth status failed: %s" % out.stderr.strip())
        return json.loads(out.stdout)

    def wait_drained(self, timeout):
        def drained():
            r = self.status()["readings"]
            return r["queued_alert"] == 0 and r["queued_routine"] == 0 and r["inflight"] == 0
        wait_for(drained, timeout, "hearth's status to show nothing queued or in flight",
                 interval=0.1)

    def stop(self):
        rc = stop_proc(self.proc, timeout=30)
        if rc not in (0, None):
            progress("note: hearth exited with %s (log: %s)" % (rc, self.log))
        return rc


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self, args):
        self.a = args
        self.work = args.work_dir
        self.certs = Certs(os.path.join(self.work, "certs"))
        self.link = os.path.join(self.work, "serial")
        self.store = os.path.join(self.work, "store", "hearth.db")
        self.snapshot = os.path.join(self.work, "snapshot")
        os.makedirs(os.path.dirname(self.store), exist_ok=True)
        self.r = {}  # results by key
        self.notes = []
        self.device = None

    # -- helpers

    def config(self, name, port, extra=()):
        path = os.path.join(self.work, name + ".toml")
        lines = [
            'gateway_id = "%s"' % GATEWAY,
            "[serial]",
            'port = "%s"' % self.link,
            "[store]",
            'path = "%s"' % self.store,
            "[mqtt]",
            'host = "127.0.0.1"',
            "port = %d" % port,
            'ca_file = "%s"' % self.certs.ca_crt,
            'cert_file = "%s"' % self.certs.gateway_crt,
            'key_file = "%s"' % self.certs.gateway_key,
        ] + list(extra)
        with open(path, "w") as f:
            f.write("# Written by bench/bench.py.\n" + "\n".join(lines) + "\n")
        return path

    def store_files(self, d):
        base = os.path.basename(self.store)
        return [f for f in os.listdir(d) if f.startswith(base)]

    def save_snapshot(self):
        os.makedirs(self.snapshot, exist_ok=True)
        d = os.path.dirname(self.store)
        for f in self.store_files(d):
            shutil.copy2(os.path.join(d, f), os.path.join(self.snapshot, f))

    def restore_snapshot(self):
        d = os.path.dirname(self.store)
        for f in self.store_files(d):
            os.unlink(os.path.join(d, f))
        for f in os.listdir(self.snapshot):
            shutil.copy2(os.path.join(self.snapshot, f), os.path.join(d, f))

    def hearth(self, config, tag):
        return Hearth(self.a.hearth, config, os.path.join(self.work, "hearth-%s.log" % tag))

    def drain_timeout(self):
        return 120 + self.a.n / 50.0  # generous: 50 readings/s is far below any peer

    def phase(self, name, fn):
        progress("phase: %s" % name)
        try:
            fn()
        except BenchError as e:
            progress("phase %s FAILED: %s" % (name, e))
            self.r.setdefault("failed", {})[name] = str(e)

    # -- phases

    def setup(self):
        subprocess.run([os.path.join(HERE, "make-certs.sh"), self.certs.dir, GATEWAY], check=True)
        self.device = Device(self.a.python, self.link)
        progress("device on %s (link %s)" % (self.device.pty, self.link))
        # The compact-encoding slot: only if this build's config accepts the key.
        cfg = self.config("cbor-check", 8883, ['encoding = "cbor"'])
        out = subprocess.run([self.a.hearth, "config", "check", "--allow-absent-port",
                              "--config", cfg], capture_output=True, text=True)
        self.cbor = out.returncode == 0
        why = (out.stderr.strip().splitlines() or ["?"])[-1]
        # "... key `mqtt.encoding` (line 13): unknown field `encoding`, expected one of ..."
        self.cbor_why = why.split(": ", 2)[-1].split(", expected")[0] if not self.cbor else ""
        progress("mqtt.encoding = \"cbor\": %s" % ("accepted" if self.cbor else
                                                  "rejected (%s)" % self.cbor_why))

    def fill(self):
        """Ingest: N readings with the broker away; the backlog for every drain."""
        dead = free_port()  # nothing listens there: hearth keeps them queued
        cfg = self.config("fill", dead)
        h = self.hearth(cfg, "fill")
        try:
            h.wait_log("Serial port opened.", 20)
            io0 = proc_write_bytes(h.pid)
            res = self.device.run({"cmd": "burst", "device": FILL_DEVICE, "count": self.a.n,
                                   "window": self.a.window}, timeout=60 + self.a.n / 20.0)
            io1 = proc_write_bytes(h.pid)
            if not res["complete"]:
                raise BenchError("the device still waits for ACKs: %s" % res)
            def queued():
                st = h.status()
                return st if st["readings"]["queued_routine"] >= self.a.n else None
            st = wait_for(queued, 30, "hearth's status to show %d queued" % self.a.n, 0.1)
            self.r["ingest"] = res
            self.r["fill_write_bytes"] = io1 - io0
            self.r["fill_hwm"] = proc_status(h.pid)["VmHWM"]
            progress("ingest: %.0f frames/s, ACK p50 %.2f ms p99 %.2f ms; %d queued"
                     % (res["rate"], res["ack_p50"] * 1e3, res["ack_p99"] * 1e3,
                        st["readings"]["queued_routine"]))
        finally:
            h.stop()
        self.save_snapshot()

    def drain_hearth(self, key, extra=(), via_proxy=False, alerts=0):
        self.restore_snapshot()
        w = World(self.work, self.certs, "broker-" + key)
        proxy = None
        h = None
        try:
            port = w.broker.port
            if via_proxy:
                proxy = spawn([self.a.python, os.path.join(HERE, "proxy.py"),
                               "--target", str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
                port = json.loads(proxy.stdout.readline())["listening"]
            cfg = self.config(key, port, extra)
            n = self.a.n
            w.sub.expect("readings", n)
            if alerts:
                w.sub.track = [("%s/%s/" % (GATEWAY, ALERT_DEVICE)).encode()]
            t0 = time.time()
            h = self.hearth(cfg, key)
            if alerts:
                h.wait_log("Serial port opened.", 20)
                w.sub.wait_count("readings", 1, 60)  # the drain has begun
                interval = max(0.01, 0.5 * self.r.get("drain_secs_batched", 2.0) / alerts)
                self.device.start({"cmd": "paced", "device": ALERT_DEVICE, "count": alerts,
                                   "interval": interval, "priority": "alert"})
            if "readings" in w.sub.unknown or self._uncountable(extra):
                h.wait_drained(self.drain_timeout())
                t_end = w.sub.last_ts["readings"]
            else:
                t_end = w.sub.wait_count("readings", n, self.drain_timeout())
            secs = t_end - t0
            out = {"secs": secs, "rate": n / secs, "messages": w.sub.msgs.get("readings", 0),
                   "received": w.sub.count("readings")}
            if alerts:
                res = self.device.result(60)
                ids = ["%s/%s/%d" % (GATEWAY, ALERT_DEVICE, s) for s in
                       sorted(int(k) for k in res["sent"])]
                arr = w.sub.wait_arrivals(ids, 60)
                lat = [arr["%s/%s/%s" % (GATEWAY, ALERT_DEVICE, s)] - t
                       for s, t in res["sent"].items()]
                during = sum(1 for i in ids if arr[i] < t_end)
                out.update(alert_p50=pct(lat, 50), alert_p99=pct(lat, 99), alert_max=max(lat),
                           alerts=len(lat), alerts_during=during,
                           alert_interval=interval)
            h.wait_drained(60)
            out["write_bytes"] = proc_write_bytes(h.pid)
            out["hwm"] = proc_status(h.pid)["VmHWM"]
            if proxy:
                proxy.stdin.write("report\n")
                proxy.stdin.flush()
                out["wire"] = json.loads(proxy.stdout.readline())
            if w.sub.count("readings") > n:
                self.notes.append("%s: the subscriber got %d readings for %d sent (duplicates)"
                                  % (key, w.sub.count("readings"), n))
            self.r["drain_" + key] = out
            progress("drain %s: %d readings in %.2f s = %.0f readings/s in %d messages%s"
                     % (key, n, secs, n / secs, out["messages"],
                        "" if not alerts else "; alerts p50 %.1f ms p99 %.1f ms"
                        % (out["alert_p50"] * 1e3, out["alert_p99"] * 1e3)))
            if key == "batched":
                self.r["drain_secs_batched"] = secs
        finally:
            if h:
                h.stop()
            if proxy:
                proxy.stdin.close()
                stop_proc(proxy, 5)
            w.close()

    @staticmethod
    def _uncountable(extra):
        return any(e.startswith("encoding") and "json" not in e for e in extra)

    def drain_mosquitto_pub(self):
        n = self.a.n
        lines = os.path.join(self.work, "readings.jsonl")
        with open(lines, "w") as f:
            for seq in range(1, n + 1):
                f.write(json.dumps({
                    "id": "peer/ICD-PUB/%d" % seq, "device": "ICD-PUB", "seq": seq,
                    "kind": "heart_rate", "value": 72.0, "unit": "bpm", "priority": "routine",
                    "device_time": "2026-12-01T08:30:00.000Z",
                    "received_at": "2026-12-01T08:30:00.412Z"}, separators=(",", ":")) + "\n")
        w = World(self.work, self.certs, "broker-mosquitto_pub")
        try:
            w.sub.expect("peer:mosquitto_pub", n)
            t0 = time.time()
            p = spawn(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(w.broker.port)]
                      + self.certs.client_args("peer")
                      + ["-i", "peer-mosquitto-pub", "-q", "2",
                         "-t", "bench/mosquitto_pub/readings", "-l"],
                      stdin=open(lines, "rb"), stdout=subprocess.DEVNULL,
                      stderr=open(os.path.join(self.work, "mosquitto_pub.stderr"), "a"))
            t_end = w.sub.wait_count("peer:mosquitto_pub", n, self.drain_timeout())
            rc = p.wait(60)
            secs = t_end - t0
            self.r["drain_mosquitto_pub"] = {"secs": secs, "rate": n / secs, "rc": rc}
            progress("drain mosquitto_pub: %d in %.2f s = %.0f readings/s (exit %s)"
                     % (n, secs, n / secs, rc))
        finally:
            w.close()

    def drain_python(self):
        n = self.a.n
        db = os.path.join(self.work, "peer-python", "outbox.db")
        os.makedirs(os.path.dirname(db), exist_ok=True)
        subprocess.run([self.a.python, os.path.join(HERE, "peer_python.py"), "fill",
                        "--db", db, "--count", str(n)], check=True, stdout=subprocess.DEVNULL)
        w = World(self.work, self.certs, "broker-python")
        try:
            w.sub.expect("peer:python", n)
            t0 = time.time()
            p = spawn([self.a.python, os.path.join(HERE, "peer_python.py"), "drain", "--db", db,
                       "--host", "127.0.0.1", "--port", str(w.broker.port),
                       "--cafile", self.certs.ca_crt, "--cert", self.certs.peer_crt,
                       "--key", self.certs.peer_key, "--topic", "bench/python/readings"],
                      stdout=subprocess.DEVNULL,
                      stderr=open(os.path.join(self.work, "peer_python.stderr"), "a"))
            t_end = w.sub.wait_count("peer:python", n, self.drain_timeout() + n / 20.0)
            rc = p.wait(120)
            secs = t_end - t0
            self.r["drain_python"] = {"secs": secs, "rate": n / secs, "rc": rc}
            progress("drain python: %d in %.2f s = %.0f readings/s (exit %s)"
                     % (n, secs, n / secs, rc))
        finally:
            w.close()

    def live(self):
        """hearth connected: end-to-end at 10/s, disk at 1/s, then idle."""
        w = World(self.work, self.certs, "broker-live")
        h = None
        try:
            cfg = self.config("live", w.broker.port)
            h = self.hearth(cfg, "live")
            h.wait_log("Serial port opened.", 20)
            h.wait_log("Connected to broker.", 30)
            h.wait_drained(self.drain_timeout())  # whatever an earlier phase left

            # End to end at 10 readings/s.
            count = int(self.a.e2e_secs * 10)
            w.sub.track = [("%s/%s/" % (GATEWAY, E2E_DEVICE)).encode()]
            res = self.device.run({"cmd": "paced", "device": E2E_DEVICE, "count": count,
                                   "interval": 0.1}, timeout=self.a.e2e_secs + 60)
            ids = {"%s/%s/%s" % (GATEWAY, E2E_DEVICE, s): t for s, t in res["sent"].items()}
            arr = w.sub.wait_arrivals(list(ids), 60)
            lat = [arr[i] - t for i, t in ids.items()]
            self.r["e2e"] = {"count": count, "p50": pct(lat, 50), "p99": pct(lat, 99),
                             "max": max(lat), "ack_p50": res["ack_p50"],
                             "ack_p99": res["ack_p99"], "naks": res["naks"]}
            progress("e2e at 10/s: p50 %.2f ms p99 %.2f ms (ACK p50 %.2f ms p99 %.2f ms)"
                     % (pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, res["ack_p50"] * 1e3,
                        res["ack_p99"] * 1e3))

            # Disk bytes per reading at 1 reading/s, each one delivered.
            count = int(self.a.slow_secs)
            w.sub.track = [("%s/%s/" % (GATEWAY, SLOW_DEVICE)).encode()]
            io0 = proc_write_bytes(h.pid)
            res = self.device.run({"cmd": "paced", "device": SLOW_DEVICE, "count": count,
                                   "interval": 1.0}, timeout=count + 60)
            w.sub.wait_arrivals(["%s/%s/%s" % (GATEWAY, SLOW_DEVICE, s) for s in res["sent"]],
                                60)
            h.wait_drained(30)
            io1 = proc_write_bytes(h.pid)
            self.r["slow"] = {"count": count, "write_bytes": io1 - io0}
            progress("1 reading/s: %d readings, %d bytes written = %.0f bytes/reading"
                     % (count, io1 - io0, (io1 - io0) / count))

            # Idle: no readings; CPU ticks over the window, then RSS.
            w.sub.track = []
            c0, t0 = proc_cpu_ticks(h.pid), time.monotonic()
            progress("idle window: %d s" % self.a.idle_secs)
            time.sleep(self.a.idle_secs)  # the measurement window itself
            c1, t1 = proc_cpu_ticks(h.pid), time.monotonic()
            st = proc_status(h.pid)
            self.r["idle"] = {"secs": t1 - t0, "ticks": c1 - c0,
                              "cpu_pct": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
                              "rss": st["VmRSS"], "hwm": st["VmHWM"]}
            progress("idle: %.3f %% CPU over %.0f s, RSS %.1f MiB (peak %.1f MiB)"
                     % (self.r["idle"]["cpu_pct"], t1 - t0, st["VmRSS"] / 2**20,
                        st["VmHWM"] / 2**20))
        finally:
            if h:
                h.stop()
            w.close()

    def run(self):
        self.setup()
        self.phase("fill / ingest (%d readings, broker away)" % self.a.n, self.fill)
        if "ingest" not in self.r:
            raise BenchError("no backlog to drain: %s" % self.r["failed"])
        self.phase("drain: hearth batched (default config)", lambda: self.drain_hearth("batched"))
        self.phase("drain: hearth batch size 1",
                   lambda: self.drain_hearth("batch1", ["batch_max_readings = 1"]))
        if self.cbor:
            self.phase("drain: hearth compact (cbor)",
                       lambda: self.drain_hearth("cbor", ['encoding = "cbor"']))
        self.phase("drain: mosquitto_pub -q 2 -l", self.drain_mosquitto_pub)
        self.phase("drain: Python (paho + sqlite3)", self.drain_python)
        self.phase("drain: hearth batched with %d alerts" % self.a.alerts,
                   lambda: self.drain_hearth("alerts", alerts=self.a.alerts))
        self.phase("drain: hearth batched through the counting proxy",
                   lambda: self.drain_hearth("wire", via_proxy=True))
        if self.cbor:
            self.phase("drain: hearth compact through the counting proxy",
                       lambda: self.drain_hearth("wire_cbor", ['encoding = "cbor"'],
                                                 via_proxy=True))
        self.phase("live: end to end, 1 reading/s, idle", self.live)
        self.device.close()


# ---------------------------------------------------------------- the table

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
    rows.append(("Backlog drain, `mosquitto_pub -q 2 -l` (1 message/reading)",
                 rate_cell("mosquitto_pub"), "reference", "–", "–"))
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
        rows.append(("RSS, steady (idle after the live phase)",
                     "%.1f MiB" % (idle["rss"] / 2**20),
                     "peak %.1f MiB live; %.1f MiB draining" % (
                         idle["hwm"] / 2**20, (bd or {}).get("hwm", 0) / 2**20),
                     "<16 MB", met(idle["rss"] < 16e6)))
        rows.append(("CPU at idle (%.0f s, connected, no readings)" % idle["secs"],
                     "%.3f %%" % idle["cpu_pct"], "%d ticks" % idle["ticks"], "<0.1 %",
                     met(idle["cpu_pct"] < 0.1)))
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


def main():
    ap = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="10,000 readings, 10 s windows (development)")
    ap.add_argument("--n", type=int, help="readings in the backlog (default 100,000)")
    ap.add_argument("--e2e-secs", type=float, help="seconds of 10 readings/s (default 60)")
    ap.add_argument("--slow-secs", type=float, help="seconds of 1 reading/s (default 60)")
    ap.add_argument("--idle-secs", type=float, help="idle CPU window (default 60)")
    ap.add_argument("--alerts", type=int, default=20, help="alerts sent during a drain")
    ap.add_argument("--window", type=int, default=8,
                    help="frames the device sends before waiting for ACKs (default 8, "
                    "as `hearth simulate`)")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/performance.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    ap.add_argument("--hearth", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--stripped", help=argparse.SUPPRESS)
    ap.add_argument("--build-desc", default="release", help=argparse.SUPPRESS)
    ap.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    ap.add_argument("--command", default="bench/run.sh", help=argparse.SUPPRESS)
    a = ap.parse_args()
    quick = a.quick
    a.n = a.n or (10_000 if quick else 100_000)
    a.e2e_secs = a.e2e_secs or (10 if quick else 60)
    a.slow_secs = a.slow_secs or (10 if quick else 60)
    a.idle_secs = a.idle_secs or (10 if quick else 60)
    a.stripped = a.stripped or a.hearth

    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    # /var/tmp is on disk where /tmp may be tmpfs (which /proc/PID/io would not see).
    made = a.work_dir is None
    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="hearth-bench-", dir="/var/tmp")
    progress("work folder %s; N = %s readings" % (a.work_dir, fmt_int(a.n)))
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", a.work_dir], capture_output=True,
                        text=True).stdout.strip() or "?"
    b = Bench(a)
    started = datetime.now(timezone.utc)
    try:
        b.run()
    except BenchError as e:
        progress("FAILED: %s" % e)
        b.r.setdefault("failed", {})["run"] = str(e)
    finally:
        if b.device:
            b.device.close()
        cleanup()
    tbl = table(b)

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    header = ("## %s · `%s` · commit %s%s\n\n"
              "Machine: %s; work folder on %s. %s. N = %s readings; end to end %d readings "
              "at 10/s; %d readings at 1/s; idle window %d s; device window %d."
              % (started.strftime("%Y-%m-%d %H:%M UTC"), a.command, commit, dirty, machine(), fs,
                 versions(a), fmt_int(a.n), int(a.e2e_secs * 10), int(a.slow_secs),
                 int(a.idle_secs), a.window))
    notes = []
    for k, v in b.r.get("failed", {}).items():
        notes.append("- Failed: %s: %s" % (k, v))
    if not b.cbor:
        notes.append("- Compact encoding: `hearth config check` rejects `mqtt.encoding = \"cbor\"` "
                     "(%s): its rows are n/a until that key lands." % b.cbor_why)
    ing = b.r.get("ingest")
    if ing and (ing["naks"] or ing["busy"] or ing["resent"]):
        notes.append("- Ingest saw %d NAKs, %d BUSY, %d resends."
                     % (ing["naks"], ing["busy"], ing["resent"]))
    notes += ["- " + n for n in b.notes]
    notes = "\n".join(notes)
    print(header + "\n\n" + tbl + ("\n\n" + notes if notes else ""))
    if not a.no_docs:
        progress("table written to %s" % write_doc(b, tbl, header, notes))
    if made and not a.keep and "failed" not in b.r:
        shutil.rmtree(a.work_dir, ignore_errors=True)
    else:
        progress("work folder kept: %s" % a.work_dir)
    return 1 if "failed" in b.r else 0


if __name__ == "__main__":
    sys.exit(main())

"""The parts of hearth's benchmark, each a real process started here and
stopped by its pid: mosquitto ([`Broker`]), a counting QoS 2 subscriber
([`Subscriber`]), the pty device (`device.py`, [`Device`]) and `hearth run`
([`Hearth`]), plus the /proc readings. Every process goes through [`spawn`],
so [`cleanup`] (registered at exit by bench.py) can stop each of them.

Waiting is done on events where a part gives one (a line from a child); only
what has none (a line in a log file, hearth's status) is polled, with a
timeout, by [`wait_for`].
"""

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
START = time.monotonic()
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def _cbor_skip(buf, i):
    """Index just past the CBOR data item at `i` (definite lengths only)."""
    major, info = buf[i] >> 5, buf[i] & 0x1F
    i += 1
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        arg = int.from_bytes(buf[i:i + size], "big")
        i += size
    else:
        raise ValueError("indefinite or reserved length")
    if major in (2, 3):  # byte or text string
        return i + arg
    if major == 4:  # array
        for _ in range(arg):
            i = _cbor_skip(buf, i)
    elif major == 5:  # map
        for _ in range(2 * arg):
            i = _cbor_skip(buf, i)
    elif major == 6:  # tag: the item it tags follows
        i = _cbor_skip(buf, i)
    return i  # ints, simple values, floats: the head was all


def cbor_batch_len(payload):
    """Readings in a compact batch `[version, gateway, series, readings]`
    (docs/compact-encoding.md); None if `payload` is not one."""
    try:
        if payload[0] != 0x84:
            return None
        i = 1
        for _ in range(3):
            i = _cbor_skip(payload, i)
        major, info = payload[i] >> 5, payload[i] & 0x1F
        if major != 4 or info > 27:
            return None
        if info < 24:
            return info
        size = 1 << (info - 24)
        return int.from_bytes(payload[i + 1:i + 1 + size], "big")
    except (IndexError, ValueError):
        return None


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
                n = cbor_batch_len(payload)  # a compact batch (docs/compact-encoding.md)
                if n is None:
                    n = 1  # unknown body: counted per message only
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
        the arrival time of the one that made `n`, or None as soon as a
        body of `cls` could not be counted."""
        with self.cv:
            self.targets.setdefault((cls, n), None)
            ok = self.cv.wait_for(
                lambda: self.counts.get(cls, 0) >= n or cls in self.unknown, timeout)
            if cls in self.unknown:
                return None
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

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
docs/performance.md (`report.py`). Progress goes to stderr. The processes
themselves are in `parts.py`.
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

from parts import (CLK_TCK, HERE, BenchError, Certs, Device, Hearth, World, cleanup, free_port,
                   on_signal, pct, proc_cpu_ticks, proc_status, proc_write_bytes, progress, spawn,
                   stop_proc, wait_for)
from report import fmt_int, git, loadavg, machine, table, versions, write_doc

GATEWAY = "gw-bench"

# Device ids, one per phase, so that every phase's device starts its own count.
FILL_DEVICE = "ICD-0042"
ALERT_DEVICE = "ICD-ALERT"
E2E_DEVICE = "ICD-E2E"
SLOW_DEVICE = "ICD-SLOW"


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
            t_end = w.sub.wait_count("readings", n, self.drain_timeout())
            if t_end is None:
                # Bodies the subscriber cannot count: done when hearth's
                # status shows nothing left, at the last message's arrival.
                h.wait_drained(self.drain_timeout())
                t_end = w.sub.last_ts["readings"]
                self.notes.append("%s: payloads not countable; drain end taken from hearth's "
                                  "status" % key)
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
            # mosquitto_pub persists nothing: at the end of its input it may
            # exit with messages still in flight, which then never arrive.
            # So wait for all n, or until it has exited and nothing more came
            # for 10 s; the rate is then over what did arrive.
            deadline = time.time() + self.drain_timeout()
            got, stalled_since = -1, None
            t_end = None
            while time.time() < deadline:
                try:
                    t_end = w.sub.wait_count("peer:mosquitto_pub", n, 2.0)
                    break
                except BenchError:
                    pass
                with w.sub.cv:
                    now_got = w.sub.counts.get("peer:mosquitto_pub", 0)
                if now_got != got:
                    got, stalled_since = now_got, time.time()
                elif p.poll() is not None and time.time() - stalled_since > 10:
                    break
            rc = p.wait(60)
            with w.sub.cv:
                got = w.sub.counts.get("peer:mosquitto_pub", 0)
                last = w.sub.last_ts.get("peer:mosquitto_pub")
            if t_end is None:
                t_end = last
            secs = t_end - t0
            self.r["drain_mosquitto_pub"] = {"secs": secs, "rate": got / secs, "rc": rc,
                                             "received": got, "n": n}
            progress("drain mosquitto_pub: %d of %d in %.2f s = %.0f readings/s (exit %s)"
                     % (got, n, secs, got / secs, rc))
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
            c0, t0, io0 = proc_cpu_ticks(h.pid), time.monotonic(), proc_write_bytes(h.pid)
            progress("idle window: %d s" % self.a.idle_secs)
            time.sleep(self.a.idle_secs)  # the measurement window itself
            c1, t1, io1 = proc_cpu_ticks(h.pid), time.monotonic(), proc_write_bytes(h.pid)
            st = proc_status(h.pid)
            self.r["idle"] = {"secs": t1 - t0, "ticks": c1 - c0,
                              "cpu_pct": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
                              "tick_pct": 100.0 / CLK_TCK / (t1 - t0),
                              "write_bytes": io1 - io0,
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
    load0 = loadavg()
    try:
        b.run()
    except BenchError as e:
        progress("FAILED: %s" % e)
        b.r.setdefault("failed", {})["run"] = str(e)
    except SystemExit:  # a signal: no table
        if made and not a.keep:
            shutil.rmtree(a.work_dir, ignore_errors=True)
        raise
    finally:
        if b.device:
            b.device.close()
        cleanup()
    tbl = table(b)

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    header = ("## %s · `%s` · commit %s%s\n\n"
              "Machine: %s; load average %s at the start, %s at the end; work folder on %s. "
              "%s; each publisher speaks its own default MQTT version (hearth: its default "
              "`mqtt.protocol`; mosquitto_pub, paho: 3.1.1). N = %s readings; end to end %d readings "
              "at 10/s; %d readings at 1/s; idle window %d s; device window %d."
              % (started.strftime("%Y-%m-%d %H:%M UTC"), a.command, commit, dirty, machine(),
                 load0, loadavg(), fs,
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

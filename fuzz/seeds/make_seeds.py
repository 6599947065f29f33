#!/usr/bin/env python3
"""Writes one well-formed seed input per fuzz target (see the doc comment at the top
of each target for the input layout). `make fuzz` passes this directory next to the
corpus, so the fuzzer starts from working requests instead of finding the ring
layout by itself. Run from this directory: python3 make_seeds.py"""
import os
import struct

NEXT, WRITE = 1, 2


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue(size_log2, d, a, u, avail_idx):
    # size selector, raw size, flags (narrow addresses, ready), desc, avail, used, idx
    return bytes([size_log2, 0, 0, 0]) + struct.pack("<IIIH", d, a, u, avail_idx)


def op(kind, a=0, b=0, c=0):
    return bytes([kind, a, b, c])


def write(path, header, ops, mem):
    """`header` without its first byte (the operation count)."""
    n = len(ops)
    ops = ops + [op(0)] * (8 - n)
    with open(path, "wb") as f:
        f.write(bytes([n]) + header + b"".join(ops) + bytes(mem))


def blk():
    # 16-sector disk with DMA log; a 16-entry queue; OUT, IN (same sector), GET_ID.
    header = struct.pack("<I", 0xFFFFFFFF) + bytes([0xFF, 16 | 0x20])
    header += queue(4, 0x100, 0x200, 0x280, 2)
    ops = [op(0), op(2)]  # notify; publish one more chain and notify
    mem = bytearray(0x900)
    descs = [
        desc(0x400, 16, NEXT, 1), desc(0x600, 512, NEXT, 2), desc(0x380, 1, WRITE, 0),
        desc(0x410, 16, NEXT, 4), desc(0x600, 512, NEXT | WRITE, 5), desc(0x381, 1, WRITE, 0),
        desc(0x420, 16, NEXT, 7), desc(0x500, 20, NEXT | WRITE, 8), desc(0x382, 1, WRITE, 0),
    ]
    for i, d in enumerate(descs):
        mem[0x100 + 16 * i:0x110 + 16 * i] = d
    mem[0x200:0x20A] = struct.pack("<HHHHH", 0, 0, 0, 3, 6)
    mem[0x400:0x430] = (struct.pack("<IIQ", 1, 0, 1) + struct.pack("<IIQ", 0, 0, 1)
                        + struct.pack("<IIQ", 8, 0, 0))
    mem[0x600:0x800] = b"\xab" * 512
    write("blk_queue/rw_getid", header, ops, mem)


def net():
    # MRG_RXBUF and friends, echo backend, DMA log, pcap; one 72-byte TX chain
    # (header + 60-byte frame) echoed into two 40-byte RX chains.
    header = struct.pack("<I", 0xFFFFFFFF) + bytes([0x0F | 0x30])
    header += queue(3, 0x100, 0x200, 0x240, 2)  # RX
    header += queue(3, 0x400, 0x500, 0x540, 1)  # TX
    ops = [op(0, 1), op(0, 0)]  # notify TX, then RX
    mem = bytearray(0xA00)
    mem[0x100:0x120] = desc(0x900, 40, WRITE, 0) + desc(0x940, 40, WRITE, 0)
    mem[0x200:0x208] = struct.pack("<HHHH", 0, 0, 0, 1)
    mem[0x400:0x420] = desc(0x800, 12, NEXT, 1) + desc(0x820, 60, 0, 0)
    mem[0x500:0x506] = struct.pack("<HHH", 0, 0, 0)
    frame = bytes.fromhex("525400123456" "525400abcdef" "0806") + bytes(range(46))
    mem[0x820:0x820 + 60] = frame
    write("net_queue/echo_mrg", header, ops, mem)


os.makedirs("blk_queue", exist_ok=True)
os.makedirs("net_queue", exist_ok=True)
blk()
net()

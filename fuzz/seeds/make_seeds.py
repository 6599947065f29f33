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


INDIRECT, EVENT_IDX = 1 << 28, 1 << 29


def blk_more():
    # Indirect table, DISCARD + WRITE_ZEROES, EVENT_IDX on; then EVENT_IDX off.
    for name, feats in (("indirect_discard_wz_evidx", 0xFFFFFFFF), ("indirect_discard_wz_noevidx", 0xFFFFFFFF & ~EVENT_IDX)):
        header = struct.pack("<I", feats) + bytes([0xFF, 16 | 0x20])
        header += queue(4, 0x100, 0x200, 0x280, 3)
        mem = bytearray(0x1000)
        # head 0: indirect table at 0x700 (IN of sector 1, 512 bytes, status)
        mem[0x100:0x110] = desc(0x700, 48, 4, 0)
        # head 1: DISCARD, head 4: WRITE_ZEROES (16-byte header, 16-byte segment, status)
        mem[0x110:0x140] = desc(0x430, 16, NEXT, 2) + desc(0x450, 16, NEXT, 3) + desc(0x383, 1, WRITE, 0)
        mem[0x140:0x170] = desc(0x440, 16, NEXT, 5) + desc(0x460, 16, NEXT, 6) + desc(0x384, 1, WRITE, 0)
        mem[0x700:0x730] = desc(0x400, 16, NEXT, 1) + desc(0x800, 512, NEXT | WRITE, 2) + desc(0x380, 1, WRITE, 0)
        mem[0x200:0x20A] = struct.pack("<HHHHH", 0, 0, 0, 1, 4)
        mem[0x400:0x410] = struct.pack("<IIQ", 0, 0, 1)
        mem[0x430:0x440] = struct.pack("<IIQ", 11, 0, 0)   # DISCARD
        mem[0x440:0x450] = struct.pack("<IIQ", 13, 0, 0)   # WRITE_ZEROES
        mem[0x450:0x460] = struct.pack("<QII", 0, 8, 0)
        mem[0x460:0x470] = struct.pack("<QII", 8, 8, 1)    # unmap flag
        write("blk_queue/" + name, header, [op(0)], mem)
    # Read-only disk with the DMA log: an IN that must work, an OUT that must not.
    header = struct.pack("<I", 0xFFFFFFFF) + bytes([0xFF, 16 | 0x20 | 0x80])
    header += queue(4, 0x100, 0x200, 0x280, 2)
    mem = bytearray(0x900)
    mem[0x100:0x160] = (desc(0x400, 16, NEXT, 1) + desc(0x600, 512, NEXT | WRITE, 2) + desc(0x380, 1, WRITE, 0)
                        + desc(0x410, 16, NEXT, 4) + desc(0x600, 512, NEXT, 5) + desc(0x381, 1, WRITE, 0))
    mem[0x200:0x208] = struct.pack("<HHHH", 0, 0, 0, 3)
    mem[0x400:0x420] = struct.pack("<IIQ", 0, 0, 1) + struct.pack("<IIQ", 1, 0, 1)
    write("blk_queue/read_only_log", header, [op(0)], mem)
    # Issue 15's hang: desc 0x1000, avail 0x2002, used 0x2004, size 16, EVENT_IDX off
    # (refused at DRIVER_OK now); and the same with EVENT_IDX on.
    for name, feats in (("overlap_noevidx", 0xFFFFFFFF & ~EVENT_IDX), ("overlap_evidx", 0xFFFFFFFF)):
        header = struct.pack("<I", feats) + bytes([0xFF, 16])
        header += queue(4, 0x1000, 0x2002, 0x2004, 1)
        mem = bytearray(0x2100)
        mem[0x1000:0x1030] = desc(0x400, 16, NEXT, 1) + desc(0x600, 512, NEXT | WRITE, 2) + desc(0x380, 1, WRITE, 0)
        mem[0x400:0x410] = struct.pack("<IIQ", 0, 0, 1)
        write("blk_queue/" + name, header, [op(0), op(2), op(0)], mem)


def net_more():
    # Indirect TX chain and indirect RX buffers, MRG_RXBUF, echo: a 100-byte frame
    # into two 64-byte RX buffers (one indirect).
    for name, feats in (("indirect_mrg_evidx", 0xFFFFFFFF), ("indirect_mrg_noevidx", 0xFFFFFFFF & ~EVENT_IDX)):
        header = struct.pack("<I", feats) + bytes([0x0F | 0x30])
        header += queue(3, 0x100, 0x200, 0x240, 2)  # RX
        header += queue(3, 0x400, 0x500, 0x540, 1)  # TX
        mem = bytearray(0xC00)
        mem[0x100:0x120] = desc(0x600, 16, 4, 0) + desc(0x940, 64, WRITE, 0)
        mem[0x600:0x610] = desc(0x900, 64, WRITE, 0)
        mem[0x200:0x208] = struct.pack("<HHHH", 0, 0, 0, 1)
        mem[0x400:0x410] = desc(0x680, 32, 4, 0)
        mem[0x680:0x6A0] = desc(0x800, 12, NEXT, 1) + desc(0xA00, 100, 0, 0)
        mem[0x500:0x506] = struct.pack("<HHH", 0, 0, 0)
        mem[0xA00:0xA64] = bytes.fromhex("525400123456" "525400abcdef" "0800") + bytes(range(86))
        write("net_queue/" + name, header, [op(0, 1), op(0, 0), op(6)], mem)


def reg_write(off, val, width=4):
    return bytes([0]) + struct.pack("<H", off) + bytes([{4: 0, 1: 2, 2: 3, 8: 4, 3: 5}[width]]) + struct.pack("<I", val)


def mmio():
    # The whole handshake as raw register writes, then notifies: blk (flag 0x04: log)
    # and net (0x01 | 0x02 echo | 0x04 log | 0x08 sg).
    def handshake(queues, feats):
        ops = [reg_write(0x70, 0), reg_write(0x70, 1), reg_write(0x70, 3)]
        ops += [reg_write(0x24, 0), reg_write(0x20, feats & 0xFFFFFFFF), reg_write(0x24, 1), reg_write(0x20, 1)]
        ops += [reg_write(0x70, 11)]
        for i, (d, a, u) in enumerate(queues):
            ops += [reg_write(0x30, i), reg_write(0x38, 8), reg_write(0x80, d), reg_write(0x84, 0),
                    reg_write(0x90, a), reg_write(0x94, 0), reg_write(0xA0, u), reg_write(0xA4, 0), reg_write(0x44, 1)]
        ops += [reg_write(0x70, 15)]
        return ops
    notify = lambda q: reg_write(0x50, q)
    # blk: IN through an indirect table, then GET_ID
    ops = handshake([(0x100, 0x200, 0x280)], INDIRECT | EVENT_IDX) + [notify(0), bytes([3, 0, 1, 1]) + b"\0" * 4]
    mem = bytearray(0x1000)
    mem[0x100:0x110] = desc(0x700, 48, 4, 0)
    mem[0x700:0x730] = desc(0x400, 16, NEXT, 1) + desc(0x800, 512, NEXT | WRITE, 2) + desc(0x380, 1, WRITE, 0)
    mem[0x200:0x206] = struct.pack("<HHH", 0, 1, 0)
    mem[0x400:0x410] = struct.pack("<IIQ", 0, 0, 1)
    with open("mmio_regs/blk_indirect", "wb") as f:
        f.write(bytes([0x04, len(ops)]) + b"".join(ops) + bytes(mem))
    # net: echo one frame from TX into RX with MRG_RXBUF
    ops = handshake([(0x100, 0x200, 0x240), (0x400, 0x500, 0x540)], (1 << 15) | (1 << 5) | INDIRECT)
    ops += [notify(1), notify(0), bytes([7]) + b"\0" * 7]
    mem = bytearray(0xC00)
    mem[0x100:0x120] = desc(0x900, 64, WRITE, 0) + desc(0x940, 64, WRITE, 0)
    mem[0x200:0x208] = struct.pack("<HHHH", 0, 2, 0, 1)
    mem[0x400:0x420] = desc(0x800, 12, NEXT, 1) + desc(0xA00, 100, 0, 0)
    mem[0x500:0x506] = struct.pack("<HHH", 0, 1, 0)
    mem[0xA00:0xA64] = bytes.fromhex("525400123456" "525400abcdef" "0800") + bytes(range(86))
    with open("mmio_regs/net_echo_mrg", "wb") as f:
        f.write(bytes([0x0F, len(ops)]) + b"".join(ops) + bytes(mem))


def elf_with_modinfo():
    """An ELF64 file with sections: null, .shstrtab, .modinfo."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    modinfo = b"name=virtio_blk\0depends=virtio,virtio_ring\0alias=virtio:d00000002v*\0softdep=pre: crc32c\0"
    data_off = 64
    shoff = data_off + len(shstrtab) + len(modinfo)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sh = lambda name, typ, off, size: struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
    return (ehdr + shstrtab + modinfo + bytes(64) + sh(1, 3, data_off, len(shstrtab))
            + sh(11, 1, data_off + len(shstrtab), len(modinfo)))


def cpio(entries):
    out = b""
    for i, (name, mode, data) in enumerate(entries):
        n = name.encode() + b"\0"
        hdr = b"070701" + b"".join(b"%08X" % v for v in (i + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(n), 0))
        out += hdr + n
        out += bytes((-len(out)) % 4) + data
        out += bytes((-len(out)) % 4)
    return out


def parsers():
    import gzip, lzma, json
    w = lambda path, data: open(path, "wb").write(data)
    w("control/session", b"hello 6.1.0-zc\nuptime 1.25\nmark begin:sendfile\nlog hi\n"
      b'report {"test":"method","method":"read","ok":true,"bytes":4096}\nmark end:sendfile\nexit 0\n')
    w("control/cmdline", b"console=ttyS0 zc.role=guest zc.methods=read,sendfile zc.size=1M zc.ip=10.0.2.15/24")
    hdr = json.dumps({"type": "header", "schema": "zc-dma-log/1", "start_unix_ns": 1}).encode()
    w("dma_log/header_only", hdr + b"\n{\"type\":\"mark\"}\n")
    w("expect_toml/defaults", b"[defaults]\nsyscalls_tolerance = 2\n\n[sendfile.sg-on]\ncpu_copy = 0\n")
    elf = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHI", 2, 62, 1) + bytes(48)
    w("images/gzip_payload", bytes([1]) + gzip.compress(elf + b"Linux version 6.1.0 (x)\n"))
    w("images/xz_payload", bytes([1]) + lzma.compress(elf))
    w("images/modules_alias", bytes([4]) + b"alias pci:v00001af4d*sv*sd*bc*sc*i* virtio_pci\nkernel/a.ko: kernel/b.ko\nsoftdep a pre: b post: c\n")
    w("images/ko_xz", bytes([5, 1]) + lzma.compress(elf_with_modinfo()))
    w("images/elf_modinfo", bytes([2]) + elf_with_modinfo())
    w("images/cpio", bytes([3]) + cpio([("init", 0o100755, b"#!/bin/sh\n"), ("dev", 0o40755, b""), ("TRAILER!!!", 0, b"")]))
    w("images/cpio_gz", bytes([3]) + gzip.compress(cpio([("bin/sh", 0o120777, b"busybox"), ("TRAILER!!!", 0, b"")])))
    # net_peer: checksums on, 2 listeners; sized 8-byte expectation, two 16-byte
    # offers, then an ARP request (so the peer knows the guest's MAC), SYN; ACK;
    # 8 bytes of data; FIN (automatic sequence numbers).
    seg = lambda ctl, data=b"": bytes([1, ctl]) + struct.pack("<H", 65535) + bytes([len(data)]) + data
    head = bytes([3, 0, 8, 2, 8]) + struct.pack("<HH", 16, 16)
    arp = bytes([3])
    ops = arp + seg(0x04 | 0x80) + seg(0x20) + seg(0x20 | 0x10, bytes(range(8))) + seg(0x20 | 0x08) + bytes([4, 100, 0])
    w("net_peer/transfer", head + ops)
    # The send port (guest port 40002: ctl bit 1), 10 ms passing (and a poll)
    # after each segment: SYN; ACK (the peer streams its 16 bytes); ACK of them with
    # the guest's count, 16 as a little-endian u64; FIN; ACK of the peer's FIN.
    SEND = 0x02
    t = bytes([4, 10, 0])
    ops = (arp + seg(SEND | 0x04 | 0x80) + t + seg(SEND | 0x20) + t
           + seg(SEND | 0x20, struct.pack("<Q", 16)) + t + seg(SEND | 0x20 | 0x08) + t
           + seg(SEND | 0x20) + t)
    w("net_peer/send", head + ops)


for d in ("blk_queue", "net_queue", "mmio_regs", "control", "dma_log", "expect_toml", "images", "net_peer"):
    os.makedirs(d, exist_ok=True)
blk()
net()
blk_more()
net_more()
mmio()
parsers()

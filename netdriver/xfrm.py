"""Minimal NETLINK_XFRM client: ESP transport-mode SAs and policies for encrypted overlays.

pyroute2 0.9 has no XFRM family, so this speaks the kernel's xfrm netlink structures
(include/uapi/linux/xfrm.h) directly over a netlink socket opened in the
wanted network namespace (netns.netns_socket). Only what the overlay needs: AEAD rfc4106(gcm(aes)) SAs
(no replay window, see REPLAY_WINDOW), output policies selecting UDP 4789 between two VTEPs with a packet mark, dumps
and deletes; `derive_sa` turns a network key into the SPI and key of one direction between two VTEPs,
and `esp_supported` probes whether a kernel can hold such an SA at all.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from shoal.netdriver.netns import netns_socket

NETLINK_XFRM = 6
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A

XFRMA_TMPL = 5
XFRMA_ALG_AEAD = 18
XFRMA_MARK = 21

XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_MODE_TRANSPORT = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
IPPROTO_ESP = 50
IPPROTO_UDP = 17
AEAD_ALG = b"rfc4106(gcm(aes))"
ICV_BITS = 64  # as Docker: 1424-byte overlay MTU on a 1500-byte underlay
SA_KEY_LEN = 36  # AES-256 key + 4-byte salt
# No anti-replay window (as Docker's): SAs are derived, not negotiated, so an SA that one end makes
# again (its agent purged a peer that was only away, or it rebooted) starts its sequence numbers at 1
# with the same SPI, and a window on the other end would drop everything until the next key rotation.
REPLAY_WINDOW = 0

SIZE_USERSA_INFO = 224
SIZE_USERPOLICY_INFO = 168


class XfrmError(OSError):
    pass


def _addr(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed + b"\0" * 12


def _selector(src: str, dst: str, proto: int, dport: int) -> bytes:
    out = _addr(dst) + _addr(src)
    out += struct.pack(">HHHH", dport, 0xFFFF if dport else 0, 0, 0)
    out += struct.pack("=HBBB3xiI", socket.AF_INET, 32, 32, proto, 0, 0)
    assert len(out) == 56
    return out


def _lifetime() -> bytes:
    return struct.pack("=8Q", XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0) + b"\0" * 32


def _attr(kind: int, data: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(data), kind) + data
    return a + b"\0" * ((4 - len(a) % 4) % 4)


@dataclass(frozen=True)
class SA:
    src: str
    dst: str
    spi: int
    reqid: int


@dataclass(frozen=True)
class Policy:
    src: str
    dst: str
    mark: int


class Xfrm:
    """One netlink socket in a namespace (path, name, or None for this process's namespace)."""

    def __init__(self, netns_path: str | None = None) -> None:
        self.sock = netns_socket(netns_path, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Xfrm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------
    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self.seq += 1
        hdr = struct.pack("=IHHII", 16 + len(payload), kind, flags | NLM_F_REQUEST, self.seq, 0)
        self.sock.send(hdr + payload)
        return self.seq

    def _request(self, kind: int, flags: int, payload: bytes) -> None:
        seq = self._send(kind, flags | NLM_F_ACK, payload)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off < len(data):
                length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", data, off)
                if mtype == NLMSG_ERROR and mseq == seq:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise XfrmError(-err, os.strerror(-err))
                    return
                off += (length + 3) & ~3

    def _dump(self, kind: int, payload: bytes) -> list[tuple[int, bytes]]:
        seq = self._send(kind, NLM_F_DUMP, payload)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off < len(data):
                length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", data, off)
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + 16)
                        if err:
                            raise XfrmError(-err, os.strerror(-err))
                        return out
                    out.append((mtype, data[off + 16:off + length]))
                off += (length + 3) & ~3

    # -- SAs ---------------------------------------------------------------------------------
    def add_sa(self, src: str, dst: str, spi: int, key: bytes, reqid: int) -> None:
        """ESP transport SA src→dst with AEAD rfc4106(gcm(aes)); key = AES key +
        4-byte salt. An SA that exists already (same dst, spi) is updated."""
        info = _selector(src, dst, 0, 0)
        info += _addr(dst) + struct.pack(">I", spi) + struct.pack("=B3x", IPPROTO_ESP)  # xfrm_id
        info += _addr(src) + _lifetime()
        info += struct.pack("=3I", 0, 0, 0)  # stats
        info += struct.pack("=IIHBBB7x", 0, reqid, socket.AF_INET, XFRM_MODE_TRANSPORT, REPLAY_WINDOW, 0)
        assert len(info) == SIZE_USERSA_INFO, len(info)
        aead = struct.pack("=64sII", AEAD_ALG, len(key) * 8, ICV_BITS) + key
        try:
            self._request(XFRM_MSG_NEWSA, NLM_F_CREATE | NLM_F_EXCL, info + _attr(XFRMA_ALG_AEAD, aead))
        except XfrmError as e:
            if e.errno != errno.EEXIST:
                raise
            self._request(XFRM_MSG_UPDSA, 0, info + _attr(XFRMA_ALG_AEAD, aead))

    def del_sa(self, dst: str, spi: int) -> None:
        payload = _addr(dst) + struct.pack(">I", spi) + struct.pack("=HBx", socket.AF_INET, IPPROTO_ESP)
        try:
            self._request(XFRM_MSG_DELSA, 0, payload)
        except XfrmError as e:
            if e.errno not in (errno.ESRCH, errno.ENOENT):
                raise

    def list_sas(self) -> list[SA]:
        out = []
        for mtype, body in self._dump(XFRM_MSG_GETSA, b""):
            if mtype != XFRM_MSG_NEWSA or len(body) < SIZE_USERSA_INFO:
                continue
            dst = str(ipaddress.IPv4Address(body[56:60]))
            (spi,) = struct.unpack_from(">I", body, 72)
            src = str(ipaddress.IPv4Address(body[80:84]))
            (reqid,) = struct.unpack_from("=I", body, 208)
            out.append(SA(src, dst, spi, reqid))
        return out

    # -- policies ----------------------------------------------------------------------------
    def set_out_policy(self, src: str, dst: str, dport: int, mark: int, reqid: int) -> None:
        """Packets src→dst UDP dport carrying `mark` must go through ESP transport (reqid's SA)."""
        info = _selector(src, dst, IPPROTO_UDP, dport) + _lifetime()
        info += struct.pack("=IIBBBB4x", 0, 0, XFRM_POLICY_OUT, 0, 0, 0)
        assert len(info) == SIZE_USERPOLICY_INFO, len(info)
        tmpl = _addr(dst) + struct.pack(">I", 0) + struct.pack("=B3x", IPPROTO_ESP)  # xfrm_id, any spi
        tmpl += struct.pack("=H2x", socket.AF_INET) + _addr(src)
        tmpl += struct.pack("=IBBBxIII", reqid, XFRM_MODE_TRANSPORT, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        assert len(tmpl) == 64
        attrs = _attr(XFRMA_TMPL, tmpl) + _attr(XFRMA_MARK, struct.pack("=II", mark, 0xFFFFFFFF))
        self._request(XFRM_MSG_UPDPOLICY, 0, info + attrs)

    def del_out_policy(self, src: str, dst: str, dport: int, mark: int) -> None:
        payload = _selector(src, dst, IPPROTO_UDP, dport) + struct.pack("=IB3x", 0, XFRM_POLICY_OUT)
        try:
            self._request(XFRM_MSG_DELPOLICY, 0, payload + _attr(XFRMA_MARK, struct.pack("=II", mark, 0xFFFFFFFF)))
        except XfrmError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH):
                raise

    def list_policies(self) -> list[Policy]:
        out = []
        for mtype, body in self._dump(XFRM_MSG_GETPOLICY, b""):
            if mtype != XFRM_MSG_NEWPOLICY or len(body) < SIZE_USERPOLICY_INFO:
                continue
            dst = str(ipaddress.IPv4Address(body[0:4]))
            src = str(ipaddress.IPv4Address(body[16:20]))
            mark = 0
            off = SIZE_USERPOLICY_INFO
            while off + 4 <= len(body):
                alen, akind = struct.unpack_from("=HH", body, off)
                if alen < 4:
                    break
                if akind == XFRMA_MARK:
                    (mark,) = struct.unpack_from("=I", body, off + 4)
                off += (alen + 3) & ~3
            out.append(Policy(src, dst, mark))
        return out


def derive_sa(network_key: bytes, src: str, dst: str) -> tuple[int, bytes]:
    """The SPI and SA key of the direction src→dst under one network key. Both ends compute the same
    pair, so nothing but the network key has to be distributed. Each direction gets its own key. SPIs
    below 256 are reserved (RFC 4303)."""
    d = hmac.new(network_key, f"shoal-esp|{src}|{dst}".encode(), hashlib.sha512).digest()
    spi = int.from_bytes(d[:4], "big") % (0x1_0000_0000 - 0x100) + 0x100
    return spi, d[4:4 + SA_KEY_LEN]


_esp_cache: dict[str | None, bool] = {}


def esp_supported(netns_path: str | None = None) -> bool:
    """Can this kernel hold an ESP rfc4106(gcm(aes)) SA (CONFIG_INET_ESP, CONFIG_CRYPTO_GCM, xfrm_user)?
    Probed once per namespace by adding an SA between two loopback addresses and removing it."""
    if netns_path not in _esp_cache:
        probe_spi = 0xD0C4FFFF
        try:
            with Xfrm(netns_path) as x:
                x.add_sa("127.0.0.1", "127.0.0.2", probe_spi, bytes(SA_KEY_LEN), 0)
                x.del_sa("127.0.0.2", probe_spi)
            _esp_cache[netns_path] = True
        except OSError as e:  # no xfrm_user: the socket fails; no ESP/GCM: the SA does
            if e.errno not in (errno.ENOSYS, errno.EPROTONOSUPPORT, errno.ENOENT, errno.EINVAL, errno.EAFNOSUPPORT):
                raise
            _esp_cache[netns_path] = False
    return _esp_cache[netns_path]

"""Encrypted networks, as Docker: VXLAN between VTEPs in IPsec ESP transport mode, AES-256-GCM.

In the host namespace, table `ip shoal_ipsec` marks outgoing UDP 4789 packets carrying an
encrypted network's VNI with mark = reqid = ESP_MARK | VNI (a route chain, so the mark re-routes
them through xfrm) and drops incoming ones of that VNI that no SA of that network decrypted. Per
remote VTEP with endpoints on the network: one output policy, one outbound SA under the primary
key, one inbound SA under every key; SPIs and SA keys are derived from the network key per
direction (xfrm.derive_sa). Everything is reconciled against what the kernel holds (found by reqid
and mark), so an agent restart adopts it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from shoal.netdriver import nft, xfrm
from shoal.netdriver.overlay.model import ESP_MARK, ESP_TABLE, VXLAN_PORT, Network, OverlayError

log = logging.getLogger(__name__)


def check_keys(network_id: str, keys: Sequence[bytes]) -> None:
    for k in keys:
        if len(k) < 16:
            raise OverlayError(f"network {network_id}: an IPsec key of {len(k)} bytes is too short; "
                               "the managers send 32-byte keys")


def sync(host_netns: str | None, local: str, n: Network, keys: Sequence[bytes], *, node_id: str,
         drop: bool = False) -> None:
    """Bring the kernel's policies and SAs of encrypted network n in line with its keys (primary
    first) and the VTEPs of its peers (drop=True: remove them all). A VTEP's policy is in place
    before its first SA, so nothing to it leaves in clear; without keys the kernel drops."""
    mark = ESP_MARK | n.vni
    keys = [] if drop else list(keys)
    vteps = set() if drop else {v for _, v in n.peers.values() if v != local}
    want_sa: dict[tuple[str, int], tuple[str, bytes]] = {}  # (dst, spi) -> (src, key)
    for r in sorted(vteps):
        if keys:
            spi, k = xfrm.derive_sa(keys[0], local, r)
            want_sa[(r, spi)] = (local, k)
        for key in keys:
            spi, k = xfrm.derive_sa(key, r, local)
            want_sa[(local, spi)] = (r, k)
    with xfrm.Xfrm(host_netns) as x:
        held_sa = {(sa.dst, sa.spi) for sa in x.list_sas() if sa.reqid == mark}
        held_pol = {p.dst for p in x.list_policies() if p.mark == mark and p.src == local}
        for r in sorted(vteps - held_pol):  # before any SA: nothing to that VTEP leaves in clear
            x.set_out_policy(local, r, VXLAN_PORT, mark, mark)
        for (dst, spi), (src, k) in want_sa.items():
            if (dst, spi) not in held_sa:
                x.add_sa(src, dst, spi, k, mark)
        for dst, spi in held_sa - want_sa.keys():
            x.del_sa(dst, spi)
        for r in sorted(held_pol - vteps):
            x.del_out_policy(local, r, VXLAN_PORT, mark)
    if not keys and vteps:
        log.warning("overlay node=%s network=%s encrypted but no keys yet: traffic to %s is dropped "
                    "until the managers send them", node_id, n.id, ",".join(sorted(vteps)))


def sync_table(host_netns: str | None, networks: Iterable[Network]) -> None:
    """The host table that marks encrypted networks' VXLAN packets for xfrm and drops clear ones."""
    vnis = sorted(n.vni for n in networks if n.encrypted)
    if not vnis:
        nft.delete_table(host_netns, "ip", ESP_TABLE)
        return
    out = "".join(f"    udp dport {VXLAN_PORT} @th,96,24 {v} meta mark set {ESP_MARK | v:#x}\n" for v in vnis)
    inp = "".join(f"    udp dport {VXLAN_PORT} @th,96,24 {v} meta secpath missing drop\n"
                  f"    udp dport {VXLAN_PORT} @th,96,24 {v} ipsec in reqid != {ESP_MARK | v:#x} drop\n"
                  for v in vnis)
    nft.replace_table(host_netns, "ip", ESP_TABLE,
                      f"  chain esp_out {{ type route hook output priority mangle; policy accept;\n{out}  }}\n"
                      f"  chain esp_in {{ type filter hook input priority filter; policy accept;\n{inp}  }}")


def state(host_netns: str | None, vni: int) -> tuple[list[xfrm.SA], list[xfrm.Policy]]:
    """What the kernel holds for the encrypted network of this VNI: (SAs, output policies)."""
    mark = ESP_MARK | vni
    with xfrm.Xfrm(host_netns) as x:
        return ([sa for sa in x.list_sas() if sa.reqid == mark],
                [p for p in x.list_policies() if p.mark == mark])


def sweep(host_netns: str | None, local: str) -> None:
    """Remove every SA, output policy and the host table of encrypted networks this node holds
    (also an earlier run's, of networks no longer known)."""
    with xfrm.Xfrm(host_netns) as x:
        for sa in x.list_sas():
            if sa.reqid & 0xFF000000 == ESP_MARK and local in (sa.src, sa.dst):
                x.del_sa(sa.dst, sa.spi)
        for p in x.list_policies():
            if p.mark & 0xFF000000 == ESP_MARK and p.src == local:
                x.del_out_policy(p.src, p.dst, VXLAN_PORT, p.mark)
    nft.delete_table(host_netns, "ip", ESP_TABLE)

"""The VXLAN overlay driver, as Docker's overlay driver. The facade is
:class:`shoal.netdriver.overlay.driver.OverlayDriver` (one per node; it keeps the lock and the
state, and implements shoal.netdriver.driverapi.NetworkDriver); beside it, functions it calls
under its lock, one concern each:

    model.py      records (Network, Endpoint, Published …), constants, OverlayError, mac_from_ip
    sandbox.py    a network's sandbox namespace: br0 + vxlan0, its metadata for restore
    endpoints.py  a task's interfaces: veths into the sandboxes, addresses, default route; adoption
    gateway.py    the gateway bridge for egress: the bridge, task ports, address allocation
    peers.py      remote endpoints: FDB and neighbour entries on vxlan0
    esp.py        encrypted networks: xfrm policies and SAs, the host's ESP nft table
    restore.py    what an earlier run left in the kernel, read back (after an agent restart)
    ../lb.py      load balancing: service VIPs, ingress routing mesh, published ports (nftables)

Layout on a host (prefix = ns_prefix)
-------------------------------------
* network sandbox: netns `<prefix>-ov-<network id[:12]>` holding bridge `br0` (gateway address,
  MTU = underlay − 50) and `vxlan0` (VNI, dstport 4789, local = advertise address, nolearning,
  proxy). vxlan0 is created in the host namespace as `vx-<vni>` and moved in, so its UDP socket
  stays in the host namespace. br0's ifalias keeps the network's metadata for restore().
* task interface: veth `ve<hash>` (port of br0, ifalias = task id) ↔ `ethN` in the container
  with the attachment's address, MAC (derived 02:42:<ip> when empty) and the overlay MTU.
* gateway bridge `shoal_gwbridge` in the host namespace (first address of `gw_subnet`), veth
  `gw<hash>` ↔ container `ethN`; default route through it; nft masquerade for egress. Networks
  with spec.internal get no gateway interface; a container only on internal networks gets no
  default route (as Docker: "Network unreachable" at once).
* nft table `ip shoal` in each container with VIPs (output-hook nat, `numgen inc` round robin),
  `ip shoal` in the host namespace (published ports, egress masquerade), and `ip shoal` in the
  ingress sandbox `<prefix>-ingress-sbox` (published port → task IP:target port, masquerade).
  Each table is rewritten as a whole in one nft transaction; existing connections keep their
  conntrack NAT mapping, so connections to live backends survive backend changes. Published
  ports: `fib daddr type local` DNAT in prerouting and output (host mode → the task's gateway
  address; ingress → the ingress sandbox's gateway address, same port), plus a hairpin masquerade
  for containers reaching their own node's published ports.
* encrypted network (spec.driver_config.options has "encrypted"), as Docker: VXLAN between VTEPs in
  IPsec ESP transport mode, AES-256-GCM (rfc4106, 64-bit ICV), overlay MTU = underlay − 76 (1424).
  In the host namespace, table `ip shoal_ipsec` marks outgoing UDP 4789 packets carrying the
  network's VNI with mark = reqid = 0xE0000000|VNI (a route chain, so the mark re-routes them
  through xfrm) and drops incoming ones of that VNI that were not decrypted by an SA of that
  network (`meta secpath missing`, `ipsec in reqid !=`). Per remote VTEP with endpoints on the
  network: one output policy (local→VTEP, UDP dport 4789, the mark; template ESP transport, the
  reqid), one outbound SA under the primary key, one inbound SA under every key. SPIs and SA keys
  are derived from the network key per direction (xfrm.derive_sa), so both ends agree without
  talking. A peer VTEP's policy is in place before its first FDB entry (nothing leaves in clear);
  without keys the policy has no SA and the kernel drops (fail closed). Keys change: the SAs of the
  new keys are added before those of dropped keys go. Everything is reconciled against what the
  kernel holds (found by reqid and mark), so an agent restart adopts it. No anti-replay window
  (xfrm.REPLAY_WINDOW).
* Netlink sockets in other namespaces are made by a short-lived setns thread (netns.netns_socket),
  not by pyroute2's fork helper: attach takes ~10-25 ms.
"""

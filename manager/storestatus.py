"""This manager's view of the store's members: `StoreStatus`, refreshed by the Manager every
`STATUS_PERIOD` from its own etcd member (member list, Raft leader, active peers), read by its
leader loops (`shoal.manager.leader`), `Info` and the quorum sentence of a refused write.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUS_PERIOD = 0.5  # seconds between two refreshes of the StoreStatus


@dataclass(frozen=True)
class MemberStatus:
    id: int  # etcd member id
    name: str  # the node id of the manager that runs it ("" until it has started)
    addr: str  # peer address host:port
    leader: bool  # the etcd (Raft) leader
    reachable: bool  # this manager's member has an active connection to it (self: True)
    is_self: bool
    learner: bool


@dataclass(frozen=True)
class StoreStatus:
    """This manager's view of the etcd cluster, from its own member."""

    self_id: int = 0
    leader_id: int = 0
    members: tuple[MemberStatus, ...] = ()

    @property
    def voters(self) -> list[MemberStatus]:
        return [m for m in self.members if not m.learner]

    @property
    def reachable(self) -> int:
        return sum(1 for m in self.voters if m.reachable)

    @property
    def total(self) -> int:
        return len(self.voters)

    @property
    def has_quorum(self) -> bool:
        return self.leader_id != 0 and self.reachable * 2 > self.total

    @property
    def leader_addr(self) -> str | None:
        return next((m.addr for m in self.members if m.leader), None)

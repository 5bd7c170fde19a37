"""Spread placement: the node with the fewest tasks of the service, then the fewest tasks overall, taken
from a heap; with placement preferences (`spread=node.labels.X`, in order) a tree of heaps first
spreads the service's tasks evenly over each label's values (nodes without the label form one group).
A node that cannot take one more task of the group leaves its heap, an emptied branch leaves its
parent's: each placement costs O(depth x log(width))."""

from __future__ import annotations

import heapq
from typing import Any

from shoal.manager.scheduler.constraint import node_attribute
from shoal.manager.scheduler.filters import Group, NodeInfo, dynamic_reason


class Leaf:
    __slots__ = ("heap", "dead")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, int, NodeInfo]] = []
        self.dead = False


class Branch:
    __slots__ = ("heap", "children", "dead")

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []
        self.children: dict[str, Any] = {}
        self.dead = False


def build_tree(g: Group, cands: list[NodeInfo]) -> Leaf | Branch | None:
    """Heaps over the candidate nodes: one leaf heap, or a tree of branches, one level per preference."""
    sid = g.service_id
    if not cands:
        return None
    if not g.spreads:
        leaf = Leaf()
        leaf.heap = [(i.by_service.get(sid, 0), i.total, i.index, i) for i in cands]
        heapq.heapify(leaf.heap)
        return leaf
    root = Branch()
    counts: dict[int, int] = {}
    tie = 0
    for info in cands:
        cur = root
        path = [root]
        for depth, key in enumerate(g.spreads):
            val = node_attribute(info.node, key) or ""
            last = depth == len(g.spreads) - 1
            child = cur.children.get(val)
            if child is None:
                child = Leaf() if last else Branch()
                cur.children[val] = child
                counts[id(child)] = 0
            cur = child
            path.append(child)
        n = info.by_service.get(sid, 0)
        for p in path[1:]:
            counts[id(p)] += n
        cur.heap.append((n, info.total, info.index, info))

    def finish(br: Branch) -> None:
        nonlocal tie
        for _val, child in sorted(br.children.items(), key=lambda kv: kv[0]):
            tie += 1
            if isinstance(child, Branch):
                finish(child)
            else:
                heapq.heapify(child.heap)
            br.heap.append([counts[id(child)], tie, child])
        heapq.heapify(br.heap)

    finish(root)
    return root


def _leaf_pick(g: Group, leaf: Leaf) -> NodeInfo | None:
    heap = leaf.heap
    while heap:
        _, _, _, info = heapq.heappop(heap)
        if dynamic_reason(g, info) is None:
            return info
    leaf.dead = True
    return None


def pick(g: Group, root: Leaf | Branch) -> NodeInfo | None:
    """The next node for one task of the group (and count it there), or None when no node can take it."""
    sid = g.service_id
    while True:
        cur = root
        path: list[tuple[Branch, list[Any]]] = []
        while isinstance(cur, Branch):
            if not cur.heap:
                return None
            entry = heapq.heappop(cur.heap)
            path.append((cur, entry))
            cur = entry[2]
        info = _leaf_pick(g, cur)
        if info is not None:
            heapq.heappush(cur.heap, (info.by_service.get(sid, 0) + 1, info.total + 1, info.index, info))
            for br, entry in path:
                entry[0] += 1
                heapq.heappush(br.heap, entry)
            return info
        # The leaf is exhausted: drop it, and every branch left empty above it.
        exhausted = True
        for br, entry in reversed(path):
            if not exhausted:
                heapq.heappush(br.heap, entry)
                continue
            exhausted = not br.heap
        if not path:
            return None

"""`swarmctl task …`: list and show tasks, and their logs."""

from __future__ import annotations

import argparse
from typing import Any

from shoal.cli import logs, query
from shoal.cli.client import Client
from shoal.cli.cmdline import CONN, add_group, add_leaf, add_listing_flags


def register(cmds: Any) -> None:
    sub = add_group(cmds, "task", "list and inspect tasks")
    p = add_leaf(sub, "ls", task_ls, "list tasks", aliases=["list"])
    add_listing_flags(p, "service=, node=, desired-state=, label=, id=")
    p = add_leaf(sub, "inspect", task_inspect, "show tasks in detail")
    p.add_argument("tasks", nargs="+", metavar="TASK")
    p.add_argument("--format", choices=("json",), default="json")
    logs.register(sub, "task", parents=[CONN])


def task_ls(c: Client, args: argparse.Namespace) -> None:
    query.print_tasks(c, args, query.list_objects(c, "task", query.list_filters(args.filter, "task")))


def task_inspect(c: Client, args: argparse.Namespace) -> None:
    query.inspect(args, c, "task", args.tasks)



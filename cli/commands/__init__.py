"""swarmctl's commands, one module per noun. Each has `register(subparsers)` that adds its command
group to the root parser (`shoal.cli.swarmctl` lists them and loads only the one a command line names).
"""

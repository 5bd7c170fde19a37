"""Shoal's Docker Engine API (1.41): the swarm endpoints the `docker` CLI and the docker SDK for Python
call, as a thin facade over the control API (it translates; it owns no state). Like `cli/`, it meets
the manager only through `proto`. swarmd serves it on every node (`<state dir>/docker.sock`); see
`shoal.engineapi.api` and docs/docker-api.md."""

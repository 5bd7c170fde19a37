"""Helpers shared by the test files: one copy of what several tests need.

Import it as ``helpers`` (``tests/`` is on ``sys.path``: pyproject's ``pythonpath``, whatever the
working directory or import mode), e.g. ``from helpers.waiting import wait_for``.

- ``aio``: ``run`` -- one coroutine on a fresh event loop, optionally bounded in time; ``aiotest``.
- ``waiting``: ``wait_for`` / ``wait_for_async`` -- poll a predicate until it holds, or fail naming it.
- ``pki``: a throw-away CA certificate, and node identities issued by a ``RootCA``.
- ``paths``: the checkout and ``shared/`` beside it.
- ``swarmctl``: the ``swarmctl`` to run, and checks of how a run ended.
- ``swarmd``: one ``swarmd`` process (``Swarmd``) and the clean-ups after killed ones.
- ``registry``: a seeded local registry (``local_registry``) and the health-checked test image config.
- ``controlapi``: the control API over a ``LocalStore`` on a unix socket -- in-process (``served``)
  or as a process that real ``swarmctl`` processes talk to (``Server``; ``python -m helpers.controlapi``).
"""

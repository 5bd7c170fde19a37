"""`OverlayDriver` is a `NetworkDriver`: every method of the Protocol that agent/network.py types its
driver with is there, with the same parameters (names, kinds, defaults) and return annotation. No
type checker runs in the suite, so this is what keeps the Protocol and the driver from drifting."""

from __future__ import annotations

import inspect

from shoal.netdriver.driverapi import NetworkDriver
from shoal.netdriver.overlay.driver import OverlayDriver


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")}


def test_the_overlay_driver_has_every_method_of_the_protocol_with_its_signature() -> None:
    wanted = _methods(NetworkDriver)
    assert wanted, "the Protocol declares no method"
    differ = []
    for name, sig in wanted.items():
        impl = getattr(OverlayDriver, name, None)
        if impl is None:
            differ.append(f"{name}: missing")
            continue
        have = inspect.signature(impl)
        if [(p.name, p.kind, p.default) for p in have.parameters.values()] != \
                [(p.name, p.kind, p.default) for p in sig.parameters.values()]:
            differ.append(f"{name}: {have} != {sig}")
        elif have.return_annotation != sig.return_annotation:
            differ.append(f"{name}: returns {have.return_annotation}, the Protocol says {sig.return_annotation}")
    assert not differ, "OverlayDriver differs from NetworkDriver:\n" + "\n".join(differ)

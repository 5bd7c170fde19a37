"""Engine errors: each carries a one-line reason suitable for a task's status message."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; ``str(e)`` is one sentence saying what failed and, where the user can, how to fix it."""


class InvalidReference(EngineError):
    pass


class ImageNotFound(EngineError):
    pass


class RegistryUnreachable(EngineError):
    pass


class RegistryError(EngineError):
    """The registry answered, but with something we cannot use (HTTP 5xx, bad JSON, unsupported media type)."""


class AuthenticationFailed(EngineError):
    pass


class DigestMismatch(EngineError):
    pass


class UnsupportedPlatform(EngineError):
    pass


class InvalidImage(EngineError):
    """A tarball or layer that is not a valid image (bad layout, unsafe paths, unsupported media type)."""


class ImageInUse(EngineError):
    pass


class ContainerNotFound(EngineError):
    pass


class ContainerExists(EngineError):
    pass


class InvalidSpec(EngineError):
    """A container spec field the engine cannot honour (bad mount, unknown user, bad capability...)."""


class ExecutableNotFound(InvalidSpec):
    pass


class UserNotFound(InvalidSpec):
    pass


class RuntimeFailed(EngineError):
    """runc or conmon failed; the message carries runc's own error line."""


class InvalidState(EngineError):
    """The operation does not fit the container's current status (start of a running container...)."""

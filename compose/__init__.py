"""Stack files: loading (YAML, interpolation, env files, merging, validation), conversion to
protobuf specs, and the plan of a stack deploy. Knows nothing of gRPC."""

from shoal.compose.errors import ComposeError, Loc
from shoal.compose.loader import ComposeSource, load
from shoal.compose.model import Project

__all__ = ["ComposeError", "ComposeSource", "Loc", "Project", "load"]

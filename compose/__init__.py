"""Stack files: loading (YAML, interpolation, env files, merging, validation), conversion to
protobuf specs, and the plan of a stack deploy. Knows nothing of gRPC.

    project = load(["stack.yml"], environment=os.environ, env_files=None)   # ComposeError on bad input
    for w in project.warnings: print(w, file=sys.stderr)
    stack = convert(project, "mystack")                                     # StackSpec of protobuf specs
    p = plan(stack, existing_services, existing_networks, existing_secrets, existing_configs, prune=False)
"""

from shoal.compose.convert import LABEL_IMAGE, LABEL_NAMESPACE, StackSpec, convert, validate_stack_name
from shoal.compose.diff import ObjectUpdate, Plan, ServiceUpdate, plan
from shoal.compose.errors import ComposeError, Loc
from shoal.compose.loader import ComposeSource, load
from shoal.compose.model import Project
from shoal.compose.normalize import to_dict

__all__ = [
    "LABEL_IMAGE", "LABEL_NAMESPACE", "ComposeError", "ComposeSource", "Loc", "ObjectUpdate", "Plan", "Project",
    "ServiceUpdate", "StackSpec", "convert", "load", "plan", "to_dict", "validate_stack_name",
]

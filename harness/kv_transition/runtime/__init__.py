"""Engine runtimes: docker (SDK), process (local process group), external (a running URL).

    from kv_transition.runtime import get_runtime
    with get_runtime("docker").running(spec, {"group": g, "cell": c}, log_path) as inst: ...
"""

from kv_transition.runtime.base import (
    CELL_LABEL,
    GROUP_LABEL,
    OWNER_LABEL,
    EngineStartError,
    Instance,
    Runtime,
    full_labels,
    get_runtime,
    register_runtime,
)

register_runtime("docker", "kv_transition.runtime.docker:DockerRuntime")
register_runtime("process", "kv_transition.runtime.process:ProcessRuntime")
register_runtime("external", "kv_transition.runtime.external:ExternalRuntime")

__all__ = ["CELL_LABEL", "GROUP_LABEL", "OWNER_LABEL", "EngineStartError", "Instance", "Runtime", "full_labels",
           "get_runtime"]

"""ldm-nodes: DDPM and latent diffusion from scratch, as a ComfyUI node pack.

ComfyUI imports this folder as a custom-node package; `pip install -e .` installs the same
folder as the package `ldm_nodes`. Imports inside the pack are relative, so both work.
"""
from .core.gc_pause import pause_for_cli
from .core.threads import short_spin_for_cli

short_spin_for_cli(__name__)  # `python -m ldm_nodes` only, before torch loads OpenMP (core/threads.py)
pause_for_cli(__name__)  # and no garbage collection until the imports are done (core/gc_pause.py)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, examples, host, model_paths  # noqa: E402

WEB_DIRECTORY = "./web"

try:  # inside ComfyUI: the nodes use its device, memory manager and progress bar
    import comfy.model_management  # noqa: F401
except ImportError:
    pass
else:
    from .nodes.comfy_host import ComfyHost

    host.configure(ComfyHost())

try:  # inside ComfyUI: the model folder, the schedule route for the web panel, the workflows' example inputs
    from server import PromptServer
except ImportError:
    PromptServer = None
if getattr(PromptServer, "instance", None) is not None:
    from .nodes.routes import add_routes

    model_paths.register_comfy_folders()
    add_routes(PromptServer.instance.routes)
    examples.install_into_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

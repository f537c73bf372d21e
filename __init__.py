"""ldm-nodes: DDPM and latent diffusion from scratch, as a ComfyUI node pack.

ComfyUI imports this folder as a custom-node package; `pip install -e .` installs the same
folder as the package `ldm_nodes`. Imports inside the pack are relative, so both work.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

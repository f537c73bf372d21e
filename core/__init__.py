"""Plain PyTorch diffusion core. Nothing in here imports ComfyUI, nodes/ or HTTP code."""

"""ComfyUI node classes (V1 API): input declarations and one call into core/ each."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

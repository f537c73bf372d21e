"""LDMEncodeText: a prompt -> the text encoder's context for cross-attention."""
from ..core.pipeline import encode_text


class LDMEncodeText:
    DESCRIPTION = ("Encodes a prompt with the model's CLIP text encoder. Prompts over 75 tokens are split into "
                   "77-token chunks that are encoded separately and concatenated; (word:1.2) and (word) weight "
                   "parts of the prompt as in ComfyUI. An empty prompt is a real encoding (use it as negative).")
    CATEGORY = "latent diffusion"
    FUNCTION = "encode"
    RETURN_TYPES = ("LDM_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The encoded prompt: what the UNet's cross-attention reads.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("LDM_TEXT_ENCODER", {"tooltip": "The text encoder from LDMLoadModel."}),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "The prompt. (word:1.3) weights a part, (word) multiplies by 1.1."}),
        }}

    def encode(self, text_encoder, text):
        return (encode_text(text_encoder.get(), text),)

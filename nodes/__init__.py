"""ComfyUI node classes (V1 API): input declarations and one call into core/ each."""
from .classify import LDMClassify, LDMComfyClassify
from .latent import LDMDecodeLatent, LDMEmptyLatent, LDMEncodeImage
from .likelihood import LDMComfyLikelihood, LDMLikelihood
from .loader import LDMCompileModel, LDMLoadModel
from .sample import LDMSample
from .sampler_select import LDMSamplerSelect
from .schedule import LDMNoiseSchedule
from .text import LDMEncodeText

NODE_CLASS_MAPPINGS = {
    "LDMLoadModel": LDMLoadModel,
    "LDMEncodeText": LDMEncodeText,
    "LDMNoiseSchedule": LDMNoiseSchedule,
    "LDMEmptyLatent": LDMEmptyLatent,
    "LDMEncodeImage": LDMEncodeImage,
    "LDMSample": LDMSample,
    "LDMDecodeLatent": LDMDecodeLatent,
    "LDMLikelihood": LDMLikelihood,
    "LDMSamplerSelect": LDMSamplerSelect,
    "LDMClassify": LDMClassify,
    "LDMComfyLikelihood": LDMComfyLikelihood,
    "LDMComfyClassify": LDMComfyClassify,
    "LDMCompileModel": LDMCompileModel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LDMLoadModel": "Load Model (LDM)",
    "LDMEncodeText": "Encode Text (LDM)",
    "LDMNoiseSchedule": "Noise Schedule (LDM)",
    "LDMEmptyLatent": "Empty Latent (LDM)",
    "LDMEncodeImage": "Encode Image (LDM)",
    "LDMSample": "Sample (LDM)",
    "LDMDecodeLatent": "Decode Latent (LDM)",
    "LDMLikelihood": "Likelihood (LDM)",
    "LDMSamplerSelect": "Sampler Select (LDM)",
    "LDMClassify": "Classify by Likelihood (LDM)",
    "LDMComfyLikelihood": "Likelihood of a ComfyUI MODEL (LDM)",
    "LDMComfyClassify": "Classify by Likelihood, ComfyUI MODEL (LDM)",
    "LDMCompileModel": "Compile Model for the CPU (LDM)",
}

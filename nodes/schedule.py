"""LDMNoiseSchedule: the noise levels a sampler visits."""
from ..core.pipeline import ScheduleSpec
from ..core.schedule import SPACINGS


class LDMNoiseSchedule:
    DESCRIPTION = ("Chooses the noise levels (sigmas) the sampler steps through: the training betas they are "
                   "drawn from and how the steps are spaced. ComfyUI's 'linear' betas are scaled_linear here, "
                   "its 'sqrt_linear' is linear. Also outputs SIGMAS for ComfyUI's custom sampler nodes.")
    CATEGORY = "latent diffusion"
    FUNCTION = "schedule"
    RETURN_TYPES = ("LDM_SCHEDULE", "SIGMAS")
    RETURN_NAMES = ("schedule", "sigmas")
    OUTPUT_TOOLTIPS = ("The schedule for LDMSample (it rebuilds the sigmas for denoise < 1).",
                       "The sigmas, descending and ending at 0 (ComfyUI's SIGMAS), for the model's scaled latents.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "beta_schedule": (list(ScheduleSpec.BETA_SCHEDULE_OPTIONS), {
                    "default": "model",
                    "tooltip": "Betas the sigmas come from. model: the ones the model was trained with (needs the "
                               "model input). linear: DDPM's 1e-4..0.02. scaled_linear: Stable Diffusion's. cosine: "
                               "Nichol & Dhariwal."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Number of sampling steps."}),
                "spacing": (list(SPACINGS), {
                    "default": "karras",
                    "tooltip": "leading / trailing / linspace: evenly spaced timesteps (diffusers' timestep_spacing). "
                               "karras: Karras et al. rho=7 sigmas. exponential: evenly spaced in log sigma."}),
                "zero_terminal_snr": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Rescale the betas so the last step is pure noise (Lin et al. 2023). Only for "
                               "v-prediction models: eps models are refused."}),
            },
            "optional": {
                "model": ("LDM_MODEL", {"tooltip": "The model whose training schedule 'model' means and whose "
                                                   "number of timesteps the other schedules use."}),
            },
        }

    def schedule(self, beta_schedule, steps, spacing, zero_terminal_snr, model=None):
        spec = ScheduleSpec(beta_schedule, steps, spacing, zero_terminal_snr)
        model_schedule = model.core.schedule if model is not None else None
        return spec, spec.sigmas(model_schedule).float()

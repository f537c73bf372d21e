"""LDMClassify: which of several prompts the model finds most likely for an image, by the bound under each;
LDMComfyClassify: the same for the models ComfyUI loads itself."""
from ..core.classify import DEFAULT_STEPS, check_candidates, classify, encode_candidates, paired_classification
from ..core.errors import InputError
from ..core.likelihood import check_bound_steps, denoiser_likelihood
from ..core.plot import plot_classification
from . import host
from .likelihood import as_image


class LDMClassify:
    DESCRIPTION = ("Zero-shot classification (Li et al. 2023): scores the image under each candidate prompt with "
                   "DDPM's variational bound, at the same random timesteps and noise for every prompt, and "
                   "answers the prompt with the lowest bound. Costs (steps + 1) x the number of prompts network "
                   "evaluations, batched.")
    CATEGORY = "latent diffusion"
    FUNCTION = "classify"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("best_prompt", "plot")
    OUTPUT_TOOLTIPS = ("The candidate under which the image has the lowest bound.",
                       "Each candidate's bound minus the best's, best first, with +- 2 standard errors of the "
                       "paired difference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One RGB image at the model's training size (a batch is refused: pick "
                                            "one with ImageFromBatch)."}),
            "model": ("LDM_MODEL", {"tooltip": "The model from LDMLoadModel (its training schedule is used)."}),
            "text_encoder": ("LDM_TEXT_ENCODER", {"tooltip": "Its text encoder, for the prompts."}),
            "vae": ("LDM_VAE", {"tooltip": "Its autoencoder: the identity for pixel-space models."}),
            "prompts": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "The candidate prompts, one per line (at least 2)."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 2, "max": 100000,
                              "tooltip": "Random timesteps shared by the candidates: more is surer and slower."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the timestep and noise draws."}),
        }}

    def classify(self, image, model, text_encoder, vae, prompts, steps, seed):
        candidates = candidate_prompts(prompts)
        contexts = encode_candidates(text_encoder.get(), candidates)
        result = classify(model.get(), vae.get(), image, contexts, steps, seed, progress=host.late_progress())
        return answer(result, candidates)


def candidate_prompts(prompts):
    """The candidates: one per non-empty line, each once; at least 2."""
    candidates = [line.strip() for line in prompts.splitlines() if line.strip()]
    check_candidates(candidates)
    return candidates


def answer(result, candidates):
    return (candidates[result.ranking[0]], as_image(plot_classification(result, candidates)))


class LDMComfyClassify:
    DESCRIPTION = ("LDMClassify for the models ComfyUI loads itself (CheckpointLoaderSimple's MODEL, CLIP and VAE: "
                   "SD1.x, SD2.x, SDXL): each prompt's bound at the same random timesteps and noise, through "
                   "ComfyUI's own sampling path, one prompt after the other.")
    CATEGORY = "latent diffusion"
    FUNCTION = "classify"
    RETURN_TYPES = LDMClassify.RETURN_TYPES
    RETURN_NAMES = LDMClassify.RETURN_NAMES
    OUTPUT_TOOLTIPS = LDMClassify.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        ours = LDMClassify.INPUT_TYPES()["required"]
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One RGB image, each side a multiple of the VAE's factor (8)."}),
            "model": ("MODEL", {"tooltip": "ComfyUI's MODEL (its sampling object gives the schedule)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder, for the prompts."}),
            "vae": ("VAE", {"tooltip": "Its VAE: the image is scored as its scaled latent."}),
            "prompts": ours["prompts"],
            "steps": ours["steps"],
            "seed": ours["seed"],
        }}

    def classify(self, image, model, clip, vae, prompts, steps, seed):
        candidates = candidate_prompts(prompts)
        if image.shape[0] != 1:
            raise InputError("image", f"a batch of {image.shape[0]}: classification takes one image at a time")
        check_bound_steps(steps, host.model_timesteps(model))  # before the VAE's and text encoder's work
        latent = host.encode(vae, image)
        conditionings = [host.encode_text(clip, text) for text in candidates]
        progress = host.late_progress()
        bounds, timesteps = [], []

        def update(done, total):  # total: one candidate's calls
            progress(len(bounds) * total + done, total * len(candidates))

        def work(denoise, x0, sigmas, batch):
            timesteps.append(len(sigmas))
            return denoiser_likelihood(denoise, x0, sigmas, "beta_tilde", steps, seed, progress=update, batch=batch)

        for conditioning in conditionings:
            bounds.append(host.run_under_model(model, conditioning, latent, work))
        return answer(paired_classification(bounds, timesteps[0]), candidates)

"""LDMClassify: which of several prompts the model finds most likely for an image, by the bound under each."""
import numpy as np
import torch

from ..core.classify import DEFAULT_STEPS, classify, encode_candidates
from ..core.errors import InputError
from ..core.plot import plot_classification
from . import host


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
        candidates = [line.strip() for line in prompts.splitlines() if line.strip()]
        if len(set(candidates)) < len(candidates):
            raise InputError("prompts", "the same prompt is given twice")
        contexts = encode_candidates(text_encoder.get(), candidates)
        progress = host.progress(1)

        def update(done, total):
            progress.total = total
            progress.update(done)

        result = classify(model.get(), vae.get(), image, contexts, steps, seed, progress=update)
        plot = torch.from_numpy(np.asarray(plot_classification(result, candidates), dtype=np.float32) / 255)[None]
        return (candidates[result.ranking[0]], plot)

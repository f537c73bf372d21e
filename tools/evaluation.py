"""What the benchmarks measure the built-in models on: held-out scenes and L_simple per timestep band.

Held-out scenes are new renders of the procedural dataset (data seed SCENE_SEED, never a training
seed). `band_losses` gives L_simple (DDPM eq. 14) restricted to bands of timesteps, with the same
posterior samples, timesteps and noise for every model of one latent shape (bench/band_loss.py).
"""
import torch

from ..core.data import downsample, make_dataset
from ..core.objective import q_sample, training_target
from ..core.train_stages import caption_ids, encode_dataset

SCENE_SEED = 12345


def scenes(n, resolution=64):
    """n held-out scenes as uint8 [n, 3, resolution, resolution] and their captions."""
    images, captions = make_dataset(n, SCENE_SEED)
    return (images if resolution == images.shape[-1] else downsample(images, resolution)), captions


BANDS = ((0, 50), (50, 150), (150, 300), (300, 500), (500, 700), (700, 850), (850, 1000))


def band_losses(checkpoint, images, captions, bands=BANDS, batch=64):
    """[mean loss per band]; the randomness (posterior sample, timesteps, noise) comes from one
    generator seeded SCENE_SEED, so models with the same latent shape see the same draws."""
    with torch.inference_mode():
        network, vae, text = (m.float().eval() for m in (checkpoint.denoiser, checkpoint.vae, checkpoint.text_encoder))
        ids, _ = caption_ids(captions)
        context = text(ids)
        mean, std = encode_dataset(vae, images, "cpu")
        g = torch.Generator().manual_seed(SCENE_SEED)
        z0 = vae.config.scale_factor * (mean + std * torch.randn(mean.shape, generator=g))
        losses = []
        for low, high in bands:
            t = torch.randint(low, high, (len(z0),), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            alpha_bar = checkpoint.schedule.alpha_bar[t]
            target = training_target(z0, eps, alpha_bar, checkpoint.prediction)
            z_t = q_sample(z0, alpha_bar, eps)
            total = 0.0
            for i in range(0, len(z0), batch):
                out = network(z_t[i:i + batch], t[i:i + batch].float(), context[i:i + batch])
                total += ((out - target[i:i + batch]) ** 2).flatten(1).mean(1).sum().item()
            losses.append(total / len(z0))
    return losses

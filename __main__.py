"""`python -m ldm_nodes ...`: the pack's command line."""
import argparse
import sys
from pathlib import Path


HELD_OUT = 8  # scenes whose variational bound `train` reports at every save


def _train(args):
    from .core.data import make_dataset, downsample
    from .core.train import train_model
    from .model_paths import model_file

    models = {}
    for option, name in (("base", args.base), ("init", args.init)):
        try:
            models[option] = (model_file(name), name) if name else None
        except ValueError as error:
            print(f"error: --{option}: {error}", file=sys.stderr)
            return 1
    print(f"drawing {args.images} scenes (data seed {args.data_seed})", file=sys.stderr)
    images, captions = make_dataset(args.images, args.data_seed)
    held_out, held_out_captions = make_dataset(HELD_OUT, args.data_seed + 1)  # new renders for the bound
    if args.resolution != images.shape[-1]:
        images, held_out = downsample(images, args.resolution), downsample(held_out, args.resolution)
    try:
        path = train_model(args.out, images, captions, args.data_seed, args.vae_steps, args.steps, args.batch_size,
                           args.vae_batch_size, args.lr, args.vae_lr, args.prediction, args.seed, args.device,
                           args.save_every, decoder_steps=args.decoder_steps, denoiser=args.denoiser, pixel=args.pixel,
                           base=models["base"], held_out=(held_out, held_out_captions), init=models["init"])
    except ValueError as error:  # a model that does not fit, or a saved state of other settings
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _run(args):
    from . import runner
    from .model_paths import set_model_dirs

    try:
        runner.set_device(args.device)
        missing = [d for d in args.models_dir if not Path(d).is_dir()]
        if missing:
            raise runner.WorkflowError(f"--models-dir {missing[0]}: no such folder")
        set_model_dirs(args.models_dir)
        prompt, workflow = runner.read_workflow(args.workflow)
        prompt = runner.apply_overrides(prompt, args.set)
        # the UI graph is embedded in the PNGs only when it is what ran: --set changes the prompt alone
        paths = runner.run(prompt, out_dir=args.out, input_dir=args.input_dir,
                           workflow=None if args.set else workflow, show_progress=not args.quiet)
    except runner.WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0


def _nll(args):
    import json

    import numpy as np
    import torch

    from .core.checkpoint import load_checkpoint
    from .core.pipeline import DiffusionModel, likelihood
    from .core.text import CLIPTokenizer, encode_prompt
    from .model_paths import resolve_model, set_model_dirs

    try:
        missing = [d for d in args.models_dir if not Path(d).is_dir()]
        if missing:
            raise ValueError(f"--models-dir {missing[0]}: no such folder")
        set_model_dirs(args.models_dir)
        images = [_read_rgb(path) for path in args.images]  # a mistyped name fails before the model loads
        checkpoint = load_checkpoint(resolve_model(args.model), device=args.device)
        model = DiffusionModel.from_checkpoint(checkpoint)
        context = None
        if args.prompt is not None:
            with torch.inference_mode():
                context = encode_prompt(CLIPTokenizer(), checkpoint.text_encoder, args.prompt)
    except ValueError as error:  # CheckpointError is one
        print(f"error: {error}", file=sys.stderr)
        return 1
    unit = "bits/dim" if model.pixel_space else "nats/dim (latent)"
    print(f"unit: {unit} ({'8-bit pixels' if model.pixel_space else 'the scaled latent of the autoencoder'}), "
          f"model {args.model}, "
          f"{'all timesteps' if not args.steps else f'{args.steps} sampled timesteps (the bound, then its standard error)'}",
          file=sys.stderr)
    results = []
    for path, pixels in zip(args.images, images):
        image = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255)[None]
        try:
            bound = likelihood(model, checkpoint.vae, image, context, args.variance, args.steps, args.seed)
        except ValueError as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 1
        per_dim = bound.nats[0] / bound.total[0]  # nats per image -> the unit
        row = {"image": path, "nll": float(bound.total[0]), "prior": float(bound.prior[0] / per_dim),
               "decoder": float(bound.decoder[0] / per_dim), "nats": float(bound.nats[0])}
        if bound.standard_error is not None:
            row["standard_error"] = float(bound.standard_error[0])
        results.append(row)
        if not args.json:
            error = f"\t{row['standard_error']:.4f}" if "standard_error" in row else ""
            print(f"{path}\t{row['nll']:.4f}{error}", flush=True)
    if args.json:
        print(json.dumps({"unit": unit, "model": args.model, "prompt": args.prompt or "", "variance": args.variance,
                          "steps": args.steps, "seed": args.seed, "images": results}, indent=1))
    return 0


def _read_rgb(path):
    """An 8-bit RGB image; palette and grey images are widened, anything with alpha or more bits refused."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the image ({error})") from None
    if image.mode not in ("RGB", "L", "P"):
        raise ValueError(f"{path}: mode {image.mode}; the bound is defined for 8-bit RGB images "
                         "(convert it to RGB without alpha first)")
    if image.mode == "P" and "transparency" in image.info:
        raise ValueError(f"{path}: a palette image with transparency; convert it to RGB first")
    return image.convert("RGB")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm_nodes", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train the tiny text-to-image model on the procedural shapes dataset",
                                description="Train the autoencoder, then the text encoder and UNet (DDPM Algorithm 1). "
                                            "Run the same command again to resume.")
    train.add_argument("--out", required=True, help="folder for states and results; rerun to resume")
    train.add_argument("--images", type=int, default=30000, help="number of procedural scenes")
    train.add_argument("--data-seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=1500)
    train.add_argument("--decoder-steps", type=int, default=0,
                       help="then fine-tune the decoder alone (frozen encoder, so latents do not change)")
    train.add_argument("--steps", type=int, default=6000, help="denoiser steps")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--vae-batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-4, help="denoiser learning rate")
    train.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder learning rate")
    train.add_argument("--prediction", choices=["eps", "v"], default="eps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--denoiser", choices=["unet", "transformer"], default="unet",
                       help="denoiser family: the SD-style UNet or a PixArt-style transformer")
    train.add_argument("--pixel", action="store_true",
                       help="pixel-space diffusion (identity autoencoder, DDPM's linear 1e-4..0.02 schedule)")
    train.add_argument("--base", metavar="MODEL",
                       help="reuse this model's text encoder (frozen) and, unless --pixel, its autoencoder; "
                            "with a builtin/ model the result holds only the new parts")
    train.add_argument("--init", metavar="MODEL",
                       help="start the denoiser from this trained model's weights instead of random ones "
                            "(fine-tuning, or more steps for a finished model); the steps count from 0")
    train.add_argument("--resolution", type=int, choices=[32, 64], default=64,
                       help="scene size; 32 box-downsamples the 64x64 scenes")
    train.add_argument("--device", default="cpu")
    train.add_argument("--save-every", type=int, default=250)
    run = commands.add_parser("run", help="run a workflow (workflows/*.json, workflows/api/*.json, or a PNG it "
                                          "wrote) without ComfyUI",
                              description="Validate the whole workflow, then run what its SaveImage/PreviewImage "
                                          "nodes need. Prints the written image files, one per line. The PNGs "
                                          "embed the prompt and the UI workflow, as ComfyUI's do.")
    run.add_argument("workflow", help="workflow file: API format (ComfyUI: Export (API)), UI format (ComfyUI: Save), "
                                      "or a PNG written by ComfyUI or by this command (its embedded workflow)")
    run.add_argument("--out", default="output", help="output folder for SaveImage (PreviewImage: OUT/temp)")
    run.add_argument("--input-dir", default="input", help="folder LoadImage reads from")
    run.add_argument("--models-dir", action="append", default=[], help="model folder (repeatable); "
                     "ckpt_name values are paths inside it, besides the built-in models")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (repeatable); VALUE is JSON when it parses, else text")
    run.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps, ...")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (errors still show)")
    nll = commands.add_parser("nll", help="the variational bound of images (bits/dim for pixel-space models)",
                              description="DDPM's variational bound (Ho et al. 2020, eq. 5) of each image under a "
                                          "model: one line per image, the path then the bound. Pixel-space models "
                                          "give bits/dim of the 8-bit image; latent models nats/dim of its latent.")
    nll.add_argument("images", nargs="+", metavar="IMAGE", help="RGB image files at the model's training size")
    nll.add_argument("--model", default="builtin/tiny-shapes-pixel.safetensors",
                     help="model name (default: the built-in pixel-space model)")
    nll.add_argument("--prompt", help="caption to condition on (default: the empty prompt)")
    nll.add_argument("--models-dir", action="append", default=[], help="model folder (repeatable)")
    nll.add_argument("--steps", type=int, default=0,
                     help="0: all T timesteps (default); K >= 2: K sampled timesteps, with a standard error")
    nll.add_argument("--variance", choices=["beta_tilde", "beta"], default="beta_tilde",
                     help="the fixed reverse variance (DDPM section 3.2)")
    nll.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    nll.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    nll.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "run":
        return _run(args)
    if args.command == "nll":
        return _nll(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

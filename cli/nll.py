"""`python -m ldm_nodes nll IMAGE...`: DDPM's variational bound of images under a model."""
import sys
from pathlib import Path

from .errors import fail, model_file
from .types import integer


def add_parser(commands):
    parser = commands.add_parser(
        "nll", help="the variational bound of images (bits/dim for pixel-space models)", exit_on_error=False,
        description="DDPM's variational bound (Ho et al. 2020, eq. 5) of each image under a model: one line per "
                    "image, the path then the bound. Pixel-space models give bits/dim of the 8-bit image; latent "
                    "models nats/dim of its latent.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="RGB image files at the model's training size")
    parser.add_argument("--model", default="builtin/tiny-shapes-pixel.safetensors",
                        help="model: a builtin/ name, a name in --models-dir or a .safetensors file's path "
                             "(default: the built-in pixel-space model)")
    parser.add_argument("--prompt", help="caption to condition on (default: the empty prompt)")
    parser.add_argument("--models-dir", action="append", default=[], help="model folder (repeatable)")
    parser.add_argument("--steps", type=integer(0), default=0,
                        help="0: all T timesteps (default); K >= 2: K sampled timesteps, with a standard error")
    parser.add_argument("--variance", choices=["beta_tilde", "beta"], default="beta_tilde",
                        help="the fixed reverse variance (DDPM section 3.2)")
    parser.add_argument("--seed", type=integer(0, 2**64 - 1), default=0, help="seed of the noise draws")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (errors still show)")
    return parser


def run(args):
    import json

    try:
        checkpoint, model, context, images = _load(args)
    except ValueError as error:  # InputError and CheckpointError are ValueErrors
        return fail(error)
    unit = "bits/dim" if model.pixel_space else "nats/dim (latent)"
    print(f"unit: {unit} ({'8-bit pixels' if model.pixel_space else 'the scaled latent of the autoencoder'}), "
          f"model {args.model}, "
          f"{'all timesteps' if not args.steps else f'{args.steps} sampled timesteps (the bound, then its standard error)'}",
          file=sys.stderr)
    results = []
    for path, pixels in zip(args.images, images):
        try:
            row = _bound(args, path, pixels, model, checkpoint.vae, context)
        except (ValueError, FloatingPointError) as error:
            return fail(f"{path}: {error}")
        results.append(row)
        if not args.json:
            error = f"\t{row['standard_error']:.4f}" if "standard_error" in row else ""
            print(f"{path}\t{row['nll']:.4f}{error}", flush=True)
    if args.json:
        print(json.dumps({"unit": unit, "model": args.model, "prompt": args.prompt or "", "variance": args.variance,
                          "steps": args.steps, "seed": args.seed, "images": results}, indent=1))
    return 0


def _load(args):
    """(checkpoint, model, context, images), once every check that needs no weights has passed: the flags,
    the model's header, the images' headers. ValueError naming the input otherwise."""
    import torch

    from ..core.checkpoint import load_checkpoint, read_header
    from ..core.devices import usable_device
    from ..core.errors import InputError
    from ..core.images import check_image_file, read_image
    from ..core.likelihood import check_bound_steps
    from ..core.pipeline import DiffusionModel
    from ..core.text import CLIPTokenizer, encode_prompt
    from ..nodes.model_paths import set_model_dirs

    missing = [d for d in args.models_dir if not Path(d).is_dir()]
    if missing:
        raise InputError(f"--models-dir {missing[0]}", "no such folder")
    device = usable_device(args.device)
    for image in args.images:  # a mistyped name fails before any model is looked up
        if Path(image).is_dir():
            raise InputError(image, "is a folder; give the image files in it")
        if not Path(image).is_file():
            raise InputError(image, "no such file")
    set_model_dirs(args.models_dir)
    path = model_file("--model", args.model)  # a builtin/ name, a name in --models-dir, or a file's path
    header = read_header(path)
    check_bound_steps(args.steps, header.schedule.num_timesteps, "--steps")
    resolution = header.metadata.get("training", {}).get("resolution")
    for image in args.images:
        check_image_file(image, resolution)
    checkpoint = load_checkpoint(path, device=device)
    model = DiffusionModel.from_checkpoint(checkpoint)
    context = None
    if args.prompt is not None:
        with torch.inference_mode():
            context = encode_prompt(CLIPTokenizer(), checkpoint.text_encoder, args.prompt)
    return checkpoint, model, context, [read_image(image)[0] for image in args.images]


def _bound(args, path, pixels, model, vae, context):
    """One image's row: the bound in the model's unit, its prior and decoder terms, and the standard error
    of a strided estimate; progress on stderr unless --quiet."""
    import math

    import torch

    from ..core.pipeline import likelihood
    from ..core.progress import TextProgress

    bar = TextProgress(f"nll {path}")
    report = None if args.quiet else (lambda done, total: bar.update(done, total, "network calls"))
    try:
        bound = likelihood(model, vae, torch.from_numpy(pixels)[None], context, args.variance, args.steps, args.seed,
                           progress=report)
    finally:
        bar.close()  # before any message, so it starts a line of its own
    if not math.isfinite(float(bound.total[0])):
        raise FloatingPointError(f"the bound is {float(bound.total[0])}: the model's output is not finite for this image")
    per_dim = bound.nats[0] / bound.total[0]  # nats per image -> the unit
    row = {"image": path, "nll": float(bound.total[0]), "prior": float(bound.prior[0] / per_dim),
           "decoder": float(bound.decoder[0] / per_dim), "nats": float(bound.nats[0])}
    if bound.standard_error is not None:
        row["standard_error"] = float(bound.standard_error[0])
    return row

"""`python -m ldm_nodes ...`: the pack's command line.

Why this file is long: it holds all three commands (train, run, nll) with their checks until the lead
splits it into cli/train.py, cli/run.py and cli/nll.py (issue 24)."""
import argparse
import sys
from pathlib import Path


DRY_RUN_PICTURES = 32  # training pictures drawn in OUT/data.png by --dry-run
HELD_OUT = 8  # default --val: held-out images whose variational bound `train` reports at every save
SCENE_BYTES = 3 * 64 * 64 + 200  # one procedural scene in memory: uint8 pixels and its caption

# Every numeric flag of `train`: (smallest, largest) allowed value, checked before any work.
TRAIN_RANGES = {
    "--images": (1, None), "--data-seed": (0, 2**63 - 1), "--vae-steps": (1, 10**8), "--decoder-steps": (0, 10**8),
    "--steps": (1, 10**8), "--batch-size": (1, 65536), "--vae-batch-size": (1, 65536), "--seed": (0, 2**53),
    "--resolution": (32, 512), "--save-every": (1, 10**8), "--val": (0, 100000), "--workers": (0, 256),
}
POSITIVE = ("--lr", "--vae-lr")


def _check_train_args(args):
    """Refuse, naming the flag, every setting that cannot work, before anything is read or written."""
    import math

    from .core.datasets import image_files
    from .core.errors import InputError
    from .core.images import background_color
    from .core.memory import available_memory
    from .runner import usable_device
    from .standins import file_in_the_way

    for flag, (low, high) in TRAIN_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < low or (high is not None and value > high):
            raise InputError(flag, f"{value} is out of range ({low} to {high if high is not None else 'any'})")
    for flag in POSITIVE:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not (math.isfinite(value) and 0 < value <= 1):
            raise InputError(flag, f"{value} must be a finite learning rate in (0, 1]")
    out = Path(args.out).absolute()
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise InputError("--out", f"{args.out} is a file, not a folder" if blocking == out else
                                  f"{args.out} lies under a file")
    device = usable_device(args.device)
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError("--device", f"{args.device}: training runs on cpu, cuda or mps")
    if args.precision == "bf16" and device.type == "cpu":
        raise InputError("--precision", "bf16 autocast is for GPUs; on the CPU train in fp32")
    if args.cache_latents and args.pixel:
        raise InputError("--cache-latents", "a pixel-space model (--pixel) has no latents to cache")
    try:
        background_color(args.background)
    except ValueError:
        raise InputError("--background", f"{args.background!r} is not a colour (a name such as white, or #rrggbb)") from None
    # --val against the data, from the listing alone (no picture decoded yet); the default is never refused
    if args.data is not None:
        files, _ = image_files(args.data)
        if args.val > max(len(files), HELD_OUT):
            raise InputError("--val", f"{args.val:,} held-out pictures, but {args.data} holds {len(files):,}")
    elif args.val > max(args.images, HELD_OUT):
        raise InputError("--val", f"{args.val:,} held-out scenes for {args.images:,} training ones; at most as "
                                  "many as --images (each costs a bound at every save)")
    if args.data is None:
        if 64 % args.resolution:
            raise InputError("--resolution", f"{args.resolution}: the procedural scenes are 64 x 64, so 32 or 64 "
                                             "(any other size needs --data)")
        needed = (args.images + args.val) * SCENE_BYTES
        available, _ = available_memory("cpu")
        if available is not None and needed > available // 2:
            raise InputError("--images", f"{args.images:,} scenes need about {needed / 2**30:,.1f} GiB in memory; "
                                         f"this machine has {available / 2**30:,.1f} GiB available (use fewer, "
                                         "or a folder with --data, which is read lazily)")


def _train_model_ref(flag, name):
    """A --base/--init model: its file, with its header read now so a broken one is refused by name."""
    from .core.checkpoint import read_model_metadata
    from .core.errors import InputError
    from .core.train import ModelRef
    from .model_paths import model_file

    try:
        path = model_file(name)
        read_model_metadata(path)
    except ValueError as error:
        raise InputError(flag, str(error)) from None
    return ModelRef(path, name)


def _train_data(args, rank):
    """(training set, held-out (images, captions) or None, what the record says about the data)."""
    from .core.data import downsample, make_dataset
    from .core.datasets import TensorImages, materialise, scan_folder, split_held_out

    say = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    if args.data is None:
        say(f"drawing {args.images} scenes (data seed {args.data_seed})")
        images, captions = make_dataset(args.images, args.data_seed)
        held_out = make_dataset(args.val, args.data_seed + 1) if args.val else None  # new renders for the bound
        if args.resolution != images.shape[-1]:
            images = downsample(images, args.resolution)
            held_out = held_out and (downsample(held_out[0], args.resolution), held_out[1])
        dataset = TensorImages(images, captions, {"data": "procedural scenes", "data_seed": args.data_seed})
        return dataset, held_out, {"data_seed": args.data_seed}
    from .core.images import background_color
    from .core.progress import TextProgress

    line = TextProgress("reading --data")
    scan = scan_folder(args.data, args.resolution, args.workers, background_color(args.background),
                       progress=(lambda done, total: line.update(done, total, "pictures decoded")) if rank == 0 else None)
    line.close()
    if scan.unreadable:
        names = ", ".join(f"{name} ({why})" for name, why in scan.unreadable[:3])
        say(f"skipping {len(scan.unreadable)} unusable image(s): {names}{' ...' if len(scan.unreadable) > 3 else ''}")
    if scan.uncaptioned:
        say(f"{scan.uncaptioned} of {len(scan.dataset)} images have no caption (no .txt, no metadata.jsonl line): "
            "they train on the empty prompt")
    dataset, held = split_held_out(scan.dataset, args.val, args.data_seed)
    if held is not None and len(held) < args.val:
        say(f"--val {args.val}: only {len(held)} of the {len(scan.dataset)} pictures are held out (never more than "
            "are trained on)")
    if held is None and args.val:
        say(f"{args.data}: one image, so no held-out split and no bound reported")
    say(f"{len(dataset)} training images, {len(held) if held else 0} held out, at {args.resolution} x {args.resolution}")
    record = {"skipped_images": len(scan.unreadable), "uncaptioned_images": scan.uncaptioned}
    return dataset, (materialise(held), held.captions) if held else None, record


def _train(args):
    import contextlib

    from .core import train, train_loop
    from .core import stops
    from .core.run_lock import hold, make_run_folder, remove_empty

    rank, created = 0, []
    try:
        with stops.sigterm_interrupts():
            _check_train_args(args)
            rank = train.distributed()[0]
            created = make_run_folder(args.out)
            with hold(args.out) if rank == 0 else contextlib.nullcontext():  # rank 0 holds it for all
                base = _train_model_ref("--base", args.base) if args.base else None
                init = _train_model_ref("--init", args.init) if args.init else None
                recipe = train.Recipe(
                    out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size, vae_lr=args.vae_lr,
                    decoder_steps=args.decoder_steps, prediction=args.prediction, seed=args.seed,
                    device=train_loop.process_device(args.device), save_every=args.save_every, denoiser=args.denoiser,
                    pixel=args.pixel, base=base, init=init, train_text=args.train_text_encoder, flip=args.flip,
                    cache_latents=args.cache_latents, workers=args.workers, precision=args.precision,
                    gradient_checkpointing=args.gradient_checkpointing)
                parts = train.prepare(recipe, args.resolution)
                dataset, held_out, data_record = _train_data(args, rank)
                if args.dry_run:
                    return _dry_run(args, dataset, rank)
                path = train.train_model(recipe, dataset, held_out, data_record, parts)
    except (ValueError, FloatingPointError) as error:  # InputError, CheckpointError; a loss that diverged
        remove_empty(created)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except stops.Interrupted as stop:
        return _interrupted(args, f"the {stop.stage} stage is saved at step {stop.step} of {stop.total}")
    except KeyboardInterrupt:
        remove_empty(created)
        return _interrupted(args, "the states saved before are kept")
    if rank == 0:
        print(path)
    return 0


def _interrupted(args, what):
    """Ctrl-C or SIGTERM: one line saying what is kept and the command that resumes; exit status 130."""
    import shlex

    command = shlex.join([Path(sys.executable).name, "-m", "ldm_nodes", *getattr(args, "argv", ["train"])])
    start = "\n" if sys.stderr.isatty() else ""  # end a progress line redrawn in place
    print(f"{start}interrupted: {what}; resume with: {command}", file=sys.stderr)
    return 130


def _dry_run(args, dataset, rank):
    """--dry-run: the first training pictures exactly as the trainer sees them, captions beneath, in
    OUT/data.png, then stop."""
    import torch

    from .core.plot import picture_grid

    if rank != 0:
        return 0
    count = min(len(dataset), DRY_RUN_PICTURES)
    images = torch.stack([dataset[i][0] for i in range(count)])
    path = Path(args.out) / "data.png"
    picture_grid(images, dataset.captions[:count]).save(path)
    print(f"dry run: the data, the flags and the memory are fine; the first {count} training pictures, as the "
          f"trainer sees them, are in {path}; nothing trained", file=sys.stderr)
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
        set_model_dirs(args.models_dir, file_paths=True)  # ckpt_name may be a file's path, e.g. a run's model
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
    import math

    import torch

    from .core.checkpoint import load_checkpoint, read_header
    from .core.errors import InputError
    from .core.images import read_image
    from .core.pipeline import DiffusionModel, likelihood
    from .core.progress import TextProgress
    from .core.text import CLIPTokenizer, encode_prompt
    from .model_paths import resolve_model, set_model_dirs
    from .runner import usable_device

    try:  # every check that needs no weights first: flags, the model's header, the images' headers
        missing = [d for d in args.models_dir if not Path(d).is_dir()]
        if missing:
            raise ValueError(f"--models-dir {missing[0]}: no such folder")
        if not 0 <= args.seed < 2**64:
            raise ValueError(f"--seed: must be in [0, 2^64 - 1], got {args.seed}")
        device = usable_device(args.device)
        for image in args.images:  # a mistyped name fails before any model is looked up
            if not Path(image).is_file():
                raise InputError(image, "no such file")
        set_model_dirs(args.models_dir)
        path = resolve_model(args.model)
        header = read_header(path)
        T = header.schedule.num_timesteps
        if not (args.steps == 0 or 2 <= args.steps <= T - 1):
            raise ValueError(f"--steps: 0 (all {T} timesteps) or a strided estimate of 2..{T - 1}, got {args.steps}")
        resolution = header.metadata.get("training", {}).get("resolution")
        for image in args.images:
            _check_image_header(image, resolution)
        checkpoint = load_checkpoint(path, device=device)
        model = DiffusionModel.from_checkpoint(checkpoint)
        context = None
        if args.prompt is not None:
            with torch.inference_mode():
                context = encode_prompt(CLIPTokenizer(), checkpoint.text_encoder, args.prompt)
        images = [read_image(image)[0] for image in args.images]
    except ValueError as error:  # InputError and CheckpointError are ValueErrors
        return _fail(error)
    unit = "bits/dim" if model.pixel_space else "nats/dim (latent)"
    print(f"unit: {unit} ({'8-bit pixels' if model.pixel_space else 'the scaled latent of the autoencoder'}), "
          f"model {args.model}, "
          f"{'all timesteps' if not args.steps else f'{args.steps} sampled timesteps (the bound, then its standard error)'}",
          file=sys.stderr)
    results = []
    for path, pixels in zip(args.images, images):
        image = torch.from_numpy(pixels)[None]
        bar = TextProgress(f"nll {path}")
        report = None if args.quiet else (lambda done, total: bar.update(done, total, "network calls"))
        try:
            bound = likelihood(model, checkpoint.vae, image, context, args.variance, args.steps, args.seed,
                               progress=report)
            bar.close()  # before any message, so it starts a line of its own
            if not math.isfinite(float(bound.total[0])):
                raise FloatingPointError(f"the bound is {float(bound.total[0])}: the model's output is not finite "
                                         "for this image")
        except (ValueError, FloatingPointError) as error:
            bar.close()
            return _fail(f"{path}: {error}")
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


def _check_image_header(path, resolution):
    """Refuse from the image file's header, before decoding it: transparency, or a size other than the
    model's training size (when its file says)."""
    from .core.images import open_image

    with open_image(path) as image:
        if "A" in image.getbands() or "transparency" in image.info:
            raise ValueError(f"{path}: mode {image.mode} has transparency; the bound is defined for RGB images "
                             "(convert it to RGB without alpha first)")
        width, height = image.size
        if resolution and (width, height) != (resolution, resolution):
            raise ValueError(f"{path}: {width}x{height}, but this model was trained on {resolution}x{resolution} "
                             "images; resize it")


def _fail(error):
    """A refused input: one line on stderr, exit status 1."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm_nodes", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a text-to-image model on your own images (--data) or the procedural shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the autoencoder, then the text encoder and denoiser (DDPM Algorithm 1), on a folder of "
                    "images (--data) or on procedural shapes; or fine-tune a Stable Diffusion 1.x file (--init). "
                    "Run the same command again to resume. Under torchrun every process trains on its share of "
                    "each batch (the global batch is --batch-size x the number of processes).")
    train.add_argument("--out", required=True, help="folder for states and results; rerun to resume")
    train.add_argument("--data", metavar="FOLDER", help="train on the png/jpg/webp images of FOLDER, captioned by a "
                       "same-name .txt or a metadata.jsonl (file_name, text); none: the procedural shapes")
    train.add_argument("--resolution", type=int, default=64, help="image size: each image is resized on its short "
                       "side and center-cropped to it (32..512, a multiple of the model's downsampling); the "
                       "procedural scenes take 32 or 64")
    train.add_argument("--background", default="white", metavar="COLOR", help="colour laid under transparent "
                       "pictures (RGBA, LA, transparent palettes): a name or #rrggbb")
    train.add_argument("--dry-run", action="store_true", help="check the data, the flags and the memory, write "
                       "OUT/data.png (the first training pictures as the trainer sees them, with their captions) "
                       "and stop before training")
    train.add_argument("--flip", action="store_true", help="mirror each training image left-right half the time")
    train.add_argument("--val", type=int, default=HELD_OUT, help="held-out images (a fixed split of --data, or new "
                       "procedural renders) whose variational bound is reported at every save; 0: none")
    train.add_argument("--images", type=int, default=30000, help="number of procedural scenes (without --data)")
    train.add_argument("--data-seed", type=int, default=0, help="seed of the procedural scenes, or of the held-out split")
    train.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images")
    train.add_argument("--cache-latents", action="store_true", help="encode every image once with the frozen "
                       "autoencoder into <out>/latents-*.npy (memory-mapped) instead of at every step")
    train.add_argument("--vae-steps", type=int, default=1500, help="autoencoder steps (stage 1)")
    train.add_argument("--decoder-steps", type=int, default=0,
                       help="then fine-tune the decoder alone (frozen encoder, so latents do not change)")
    train.add_argument("--steps", type=int, default=6000, help="denoiser steps")
    train.add_argument("--batch-size", type=int, default=64, help="denoiser batch per process")
    train.add_argument("--vae-batch-size", type=int, default=16, help="autoencoder batch per process")
    train.add_argument("--lr", type=float, default=2e-4, help="denoiser learning rate")
    train.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder learning rate")
    train.add_argument("--prediction", choices=["eps", "v"], default=None,
                       help="what the denoiser predicts (default: eps, or the --init model's own)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    train.add_argument("--denoiser", choices=["unet", "transformer"], default="unet",
                       help="denoiser family: the SD-style UNet or a PixArt-style transformer")
    train.add_argument("--pixel", action="store_true",
                       help="pixel-space diffusion (identity autoencoder, DDPM's linear 1e-4..0.02 schedule)")
    train.add_argument("--base", metavar="MODEL",
                       help="reuse this model's text encoder (frozen) and, unless --pixel, its autoencoder; "
                            "with a builtin/ model the result holds only the new parts")
    train.add_argument("--init", metavar="MODEL",
                       help="start the denoiser from this trained model's weights (the steps count from 0); a Stable "
                            "Diffusion 1.x file is fine-tuned whole: its UNet trained, its autoencoder frozen, the "
                            "result saved in the same SD1.x layout")
    train.add_argument("--train-text-encoder", action="store_true",
                       help="with an SD1.x --init: train its text encoder too (else it stays frozen)")
    train.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: forward passes under bf16 autocast on a GPU (weights and optimizer stay fp32)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each denoiser block's activations in the backward pass: less memory, more time")
    train.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (under torchrun: "
                       "cuda picks the process's LOCAL_RANK)")
    train.add_argument("--save-every", type=int, default=250,
                       help="steps between saved states (and held-out bounds, and plot redraws)")
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
    nll.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (errors still show)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes an interrupted run
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

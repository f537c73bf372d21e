"""`python -m ldm_nodes train`: train a text-to-image model (or fine-tune one) from the command line.

Each flag is declared once, in `add_parser`, with its range as its argparse type; `_check_train_args` holds
the checks that combine flags. Both run before anything is read or written."""
import argparse
import sys
from pathlib import Path

from .types import integer, learning_rate

DRY_RUN_PICTURES = 32  # training pictures drawn in OUT/data.png by --dry-run
HELD_OUT = 8  # default --val: held-out images whose variational bound `train` reports at every save
SCENE_BYTES = 3 * 64 * 64 + 200  # one procedural scene in memory: uint8 pixels and its caption


def add_parser(commands):
    parser = commands.add_parser(
        "train", help="train a text-to-image model on your own images (--data) or the procedural shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, exit_on_error=False,
        description="Train the autoencoder, then the text encoder and denoiser (DDPM Algorithm 1), on a folder of "
                    "images (--data) or on procedural shapes; or fine-tune a Stable Diffusion 1.x file (--init). "
                    "Run the same command again to resume. Under torchrun every process trains on its share of "
                    "each batch (the global batch is --batch-size x the number of processes).")
    parser.add_argument("--out", required=True, help="folder for states and results; rerun to resume")
    parser.add_argument("--data", metavar="FOLDER", help="train on the png/jpg/webp images of FOLDER, captioned by a "
                       "same-name .txt or a metadata.jsonl (file_name, text); none: the procedural shapes")
    parser.add_argument("--resolution", type=integer(32, 512), default=64, help="image size: each image is resized on its short "
                       "side and center-cropped to it (32..512, a multiple of the model's downsampling); the "
                       "procedural scenes take 32 or 64")
    parser.add_argument("--background", default="white", metavar="COLOR", help="colour laid under transparent "
                        "pictures (RGBA, LA, transparent palettes): a name or #rrggbb")
    parser.add_argument("--dry-run", action="store_true", help="check the data, the flags and the memory, write "
                        "OUT/data.png (the first training pictures as the trainer sees them, with their captions) "
                        "and stop before training")
    parser.add_argument("--flip", action="store_true", help="mirror each training image left-right half the time")
    parser.add_argument("--val", type=integer(0, 100000), default=HELD_OUT, help="held-out images (a fixed split of --data, or new "
                       "procedural renders) whose variational bound is reported at every save; 0: none")
    parser.add_argument("--images", type=integer(1, None), default=30000, help="number of procedural scenes (without --data)")
    parser.add_argument("--data-seed", type=integer(0, 2**63 - 1), default=0, help="seed of the procedural scenes, or of the held-out split")
    parser.add_argument("--workers", type=integer(0, 256), default=2, help="DataLoader worker processes decoding images")
    parser.add_argument("--cache-latents", action="store_true", help="encode every image once with the frozen "
                       "autoencoder into <out>/latents-*.npy (memory-mapped) instead of at every step")
    parser.add_argument("--vae-steps", type=integer(1, 10**8), default=1500, help="autoencoder steps (stage 1)")
    parser.add_argument("--decoder-steps", type=integer(0, 10**8), default=0,
                       help="then fine-tune the decoder alone (frozen encoder, so latents do not change)")
    parser.add_argument("--steps", type=integer(1, 10**8), default=6000, help="denoiser steps")
    parser.add_argument("--batch-size", type=integer(1, 65536), default=64, help="denoiser batch per process")
    parser.add_argument("--vae-batch-size", type=integer(1, 65536), default=16, help="autoencoder batch per process")
    parser.add_argument("--lr", type=learning_rate, default=2e-4, help="denoiser learning rate")
    parser.add_argument("--vae-lr", type=learning_rate, default=1e-3, help="autoencoder learning rate")
    parser.add_argument("--prediction", choices=["eps", "v"], default=None,
                       help="what the denoiser predicts (default: eps, or the --init model's own)")
    parser.add_argument("--seed", type=integer(0, 2**53), default=0, help="seed of the weights, batches and noise")
    parser.add_argument("--denoiser", default="unet",
                        help="denoiser family, by its name in core/families.py: unet (SD-style) or transformer "
                             "(PixArt-style); an unknown name is refused before any work")
    parser.add_argument("--pixel", action="store_true",
                       help="pixel-space diffusion (identity autoencoder, DDPM's linear 1e-4..0.02 schedule)")
    parser.add_argument("--base", metavar="MODEL",
                       help="reuse this model's text encoder (frozen) and, unless --pixel, its autoencoder; "
                            "with a builtin/ model the result holds only the new parts")
    parser.add_argument("--init", metavar="MODEL",
                       help="start the denoiser from this trained model's weights (the steps count from 0); a Stable "
                            "Diffusion 1.x file is fine-tuned whole: its UNet trained, its autoencoder frozen, the "
                            "result saved in the same SD1.x layout")
    parser.add_argument("--train-text-encoder", action="store_true",
                       help="with an SD1.x --init: train its text encoder too (else it stays frozen)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: forward passes under bf16 autocast on a GPU (weights and optimizer stay fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each denoiser block's activations in the backward pass: less memory, more time")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (under torchrun: "
                       "cuda picks the process's LOCAL_RANK)")
    parser.add_argument("--save-every", type=integer(1, 10**8), default=250,
                       help="steps between saved states (and held-out bounds, and plot redraws)")
    return parser


def _check_train_args(args):
    """Refuse, naming the flag, every combination of settings that cannot work, before anything is read or
    written (each flag's own range is its argparse type)."""
    from ..core.datasets import image_files
    from ..core.errors import InputError
    from ..core.images import background_color
    from ..core.memory import available_memory
    from ..core.devices import usable_device
    from ..core.files import file_in_the_way

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
    from ..core.checkpoint import read_model_metadata
    from ..core.errors import InputError
    from ..core.train import ModelRef
    from .errors import model_file

    path = model_file(flag, name)
    try:
        read_model_metadata(path)
    except ValueError as error:  # CheckpointError
        raise InputError(flag, str(error)) from None
    return ModelRef(path, name)


def _train_data(args, rank):
    """(training set, held-out (images, captions) or None, what the record says about the data)."""
    from ..core.data import downsample, make_dataset
    from ..core.datasets import TensorImages, materialise, scan_folder, split_held_out

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
    from ..core.images import background_color
    from ..core.progress import TextProgress

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


def run(args):
    import contextlib

    from ..core import stops, train, train_loop
    from ..core.run_lock import hold, make_run_folder, remove_empty

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

    from ..core.plot import picture_grid

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

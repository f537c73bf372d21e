"""`python -m ldm_nodes ...`: the pack's command line."""
import argparse
import sys
from pathlib import Path


def _train(args):
    from .core.data import make_dataset
    from .core.train import train_model

    print(f"drawing {args.images} scenes (data seed {args.data_seed})", file=sys.stderr)
    images, captions = make_dataset(args.images, args.data_seed)
    path = train_model(args.out, images, captions, args.data_seed, args.vae_steps, args.steps, args.batch_size,
                       args.vae_batch_size, args.lr, args.vae_lr, args.prediction, args.seed, args.device, args.save_every)
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
        prompt = runner.apply_overrides(runner.load_workflow(args.workflow), args.set)
        paths = runner.run(prompt, out_dir=args.out, input_dir=args.input_dir)
    except runner.WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0


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
    train.add_argument("--steps", type=int, default=6000, help="denoiser steps")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--vae-batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-4, help="denoiser learning rate")
    train.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder learning rate")
    train.add_argument("--prediction", choices=["eps", "v"], default="eps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--save-every", type=int, default=250)
    run = commands.add_parser("run", help="run an API-format workflow (workflows/api/*.json) without ComfyUI",
                              description="Validate the whole workflow, then run what its SaveImage/PreviewImage "
                                          "nodes need. Prints the written image files, one per line.")
    run.add_argument("workflow", help="API-format workflow JSON (ComfyUI: Export (API))")
    run.add_argument("--out", default="output", help="output folder for SaveImage (PreviewImage: OUT/temp)")
    run.add_argument("--input-dir", default="input", help="folder LoadImage reads from")
    run.add_argument("--models-dir", action="append", default=[], help="model folder (repeatable); "
                     "ckpt_name values are paths inside it, besides the built-in models")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (repeatable); VALUE is JSON when it parses, else text")
    run.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps, ...")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "run":
        return _run(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

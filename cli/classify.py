"""`python -m ldm_nodes classify`: which of several prompts a model finds most likely for an image, by the
variational bound under each (core/classify.py)."""
import argparse
import json
import sys
from pathlib import Path

from .types import integer

DEFAULT_MODEL = "builtin/tiny-shapes.safetensors"


def add_parser(commands):
    from ..core.classify import DEFAULT_STEPS

    parser = commands.add_parser(
        "classify", help="zero-shot classification: rank candidate prompts by the image's bound under each",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, exit_on_error=False,
        description="Score each image under each candidate prompt with DDPM's variational bound at the same "
                    "timesteps and noise for every prompt (Li et al. 2023); the lowest bound is the model's answer. "
                    "Prints, per image, the prompts best first with their bound and the difference to the best "
                    "+- its standard error.")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="RGB image files at the model's training size")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a candidate prompt (repeat, at least 2), the same for every IMAGE")
    parser.add_argument("--batch", metavar="FILE.jsonl",
                        help='one image per line with its own candidates: {"image": path, "prompts": [...]}; a '
                             "relative path is taken from the file's folder")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a builtin/ model name or a .safetensors file's path (default: the built-in shapes UNet)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="timesteps sampled per image, shared by its prompts (2..T-1)")
    parser.add_argument("--seed", type=integer(0, 2**64 - 1), default=0, help="seed of the timestep and noise draws")
    parser.add_argument("--json", metavar="OUT", help="also write the results to OUT as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (errors still show)")


def _questions(args):
    """[(image path, [prompts])] from the command line or --batch, every field checked."""
    from ..core.classify import check_candidates
    from ..core.errors import InputError

    if args.batch is not None:
        if args.images or args.prompt:
            raise InputError("--batch", "takes the images and prompts from the file: give no IMAGE or --prompt")
        questions = []
        try:
            lines = Path(args.batch).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError("--batch", f"{args.batch}: cannot read it ({error.__class__.__name__})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{args.batch} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(where, f"not JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(
                    row.get("prompts"), list) or not all(isinstance(p, str) for p in row["prompts"]):
                raise InputError(where, 'expected {"image": path, "prompts": [text, ...]}')
            image = Path(row["image"])
            if not image.is_absolute():  # relative to the file, so a batch travels with its images
                image = Path(args.batch).parent / image
            questions.append((str(image), row["prompts"], where))
        if not questions:
            raise InputError("--batch", f"{args.batch} holds no lines")
    else:
        if not args.images:
            raise InputError("IMAGE", "give at least one image, or --batch FILE.jsonl")
        questions = [(image, args.prompt, "--prompt") for image in args.images]
    for image, prompts, where in questions:
        check_candidates(prompts, where)
        if not Path(image).is_file():
            raise InputError(image, "no such file")
    return [(image, prompts) for image, prompts, _ in questions]


def _check(args):
    """Every check that needs no weights: flags, the model's header, the images' headers, the output path."""
    from ..core.checkpoint import read_header
    from ..core.errors import InputError
    from ..core.images import check_image_file
    from .errors import model_file

    if args.json is not None and (Path(args.json).is_dir() or not Path(args.json).absolute().parent.is_dir()):
        raise InputError("--json", f"{args.json}: not a file in an existing folder")
    questions = _questions(args)
    path = model_file("--model", args.model)
    header = read_header(path)
    T = header.schedule.num_timesteps
    if not 2 <= args.steps <= T - 1:
        raise InputError("--steps", f"{args.steps}: 2..{T - 1} timesteps for this model (T = {T})")
    resolution = header.metadata.get("training", {}).get("resolution")
    for image, _ in questions:
        check_image_file(image, resolution)
    return path, questions


def run(args):
    import torch

    from ..core.checkpoint import load_checkpoint
    from ..core.classify import classify, encode_candidates
    from ..core.images import read_image
    from ..core.pipeline import DiffusionModel, TextEncoder
    from ..core.progress import TextProgress
    from ..core.text import CLIPTokenizer

    try:
        path, questions = _check(args)
        checkpoint = load_checkpoint(path)
        model = DiffusionModel.from_checkpoint(checkpoint)
        text_encoder = TextEncoder(checkpoint.text_encoder, CLIPTokenizer())
    except ValueError as error:  # InputError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 1
    results = []
    for image_path, prompts in questions:
        bar = TextProgress(f"classify {image_path}")
        report = None if args.quiet else (lambda done, total: bar.update(done, total, "network calls"))
        try:
            image = torch.from_numpy(read_image(image_path)[0])[None]
            contexts = encode_candidates(text_encoder, prompts)
            result = classify(model, checkpoint.vae, image, contexts, args.steps, args.seed, progress=report)
            bar.close()
            if not torch.isfinite(result.bounds).all():
                raise FloatingPointError("a bound is not finite: the model's output is not finite for this image")
        except (ValueError, FloatingPointError) as error:
            bar.close()
            print(f"error: {image_path}: {error}", file=sys.stderr)
            return 1
        results.append({"image": image_path, "prompts": prompts, "bounds": result.bounds.tolist(),
                        "standard_errors": result.standard_error.tolist(),
                        "ranking": [prompts[c] for c in result.ranking]})
        _print_table(image_path, prompts, result)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "unit": result.unit, "steps": args.steps, "seed": args.seed, "images": results},
            indent=1))
    return 0


def _print_table(image_path, prompts, result):
    """The image, then its prompts best first: rank, bound, difference to the best +- standard error."""
    print(f"{image_path}  [{result.unit}]")
    best = float(result.bounds[result.ranking[0]])
    for rank, c in enumerate(result.ranking, 1):
        bound = float(result.bounds[c])
        difference = "" if rank == 1 else f"+{bound - best:.4f} +- {float(result.standard_error[c]):.4f}"
        print(f"  {rank}  {bound:9.4f}  {difference:<22}  {prompts[c]}", flush=True)

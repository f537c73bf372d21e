"""`python -m ldm_nodes run WORKFLOW`: a workflow (API, UI or a PNG's) run without ComfyUI."""
import sys
from pathlib import Path


def add_parser(commands):
    parser = commands.add_parser("run", help="run a workflow (workflows/*.json, workflows/api/*.json, or a PNG it "
                                          "wrote) without ComfyUI",
                              description="Validate the whole workflow, then run what its SaveImage/PreviewImage "
                                          "nodes need. Prints the written image files, one per line. The PNGs "
                                          "embed the prompt and the UI workflow, as ComfyUI's do.")
    parser.add_argument("workflow", help="workflow file: API format (ComfyUI: Export (API)), UI format (ComfyUI: Save), "
                                      "or a PNG written by ComfyUI or by this command (its embedded workflow)")
    parser.add_argument("--out", default="output", help="output folder for SaveImage (PreviewImage: OUT/temp)")
    parser.add_argument("--input-dir", default="input", help="folder LoadImage reads from")
    parser.add_argument("--models-dir", action="append", default=[], help="model folder (repeatable); "
                     "ckpt_name values are paths inside it, besides the built-in models")
    parser.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (repeatable); VALUE is JSON when it parses, else text")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps, ...")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (errors still show)")
    return parser


def run(args):
    from ..headless import runner
    from ..nodes.model_paths import set_model_dirs

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

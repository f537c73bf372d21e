"""Model names as nodes show them, and the files they resolve to.

The pack's own models are listed first as `builtin/<file name>` and resolve only inside the pack's
models/ folder. Other names are paths relative to a model folder: inside ComfyUI, the folders
folder_paths knows for `ldm` (models/ldm, registered here) and `checkpoints`; without ComfyUI, the
folders given to `set_model_dirs` (the CLI's --models-dir). Only .safetensors files are listed, and
a name that resolves outside every folder ('../', absolute paths, links out) is refused.
"""
import os
from pathlib import Path

from ..core.checkpoint import provide_parts

# The pack's own models: listed first, and the only files other models may take parts from.
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "models"
BUILTIN_PREFIX = "builtin/"
provide_parts(BUILTIN_PREFIX, BUILTIN_DIR)

EXTENSION = ".safetensors"
DEFAULT_MODEL = "tiny-shapes.safetensors"
FOLDER_KINDS = ("ldm", "checkpoints")

_model_dirs = []
_file_paths = []  # [True] once the command line allows a model file's own path as a name


def _folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_comfy_folders():
    """Register models/ldm with ComfyUI (so extra_model_paths.yaml can add to it), .safetensors only."""
    fp = _folder_paths()
    if fp is None:
        return
    dirs = fp.folder_names_and_paths.get("ldm", ([], set()))[0]
    default = os.path.join(fp.models_dir, "ldm")
    fp.folder_names_and_paths["ldm"] = ([*dirs, default] if default not in dirs else dirs, {EXTENSION})


def set_model_dirs(dirs, file_paths=False):
    """The folders searched outside ComfyUI (the CLI's --models-dir). file_paths: a name may also be
    the path of a .safetensors file anywhere (`run`'s ckpt_name, e.g. a training run's model.safetensors);
    the nodes inside ComfyUI and the HTTP routes never allow that."""
    _model_dirs[:] = [Path(d).resolve() for d in dirs]
    _file_paths[:] = [True] if file_paths else []


def builtin_models():
    """builtin/<file> names, the default model (DEFAULT_MODEL) first."""
    names = sorted(p.name for p in BUILTIN_DIR.glob("*" + EXTENSION)) if BUILTIN_DIR.is_dir() else []
    return [BUILTIN_PREFIX + n for n in sorted(names, key=lambda n: n != DEFAULT_MODEL)]


def _user_dirs():
    fp = _folder_paths()
    if fp is None:
        return list(_model_dirs)
    return [Path(d).resolve() for kind in FOLDER_KINDS for d in fp.get_folder_paths(kind)]


def list_models():
    """Built-in models first, then every .safetensors file under the model folders (relative names)."""
    names = []
    for root in _user_dirs():
        if root.is_dir():
            names += sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + EXTENSION) if p.is_file())
    return builtin_models() + [n for n in dict.fromkeys(names) if n not in builtin_models()]


def resolve_model(name):
    """The file behind a listed name (or, when set_model_dirs allowed it outside ComfyUI, a file's own
    path); ValueError naming `ckpt_name` for anything else."""
    if not isinstance(name, str) or not name:
        raise ValueError("ckpt_name: empty model name")
    if not name.endswith(EXTENSION):
        raise ValueError(f"ckpt_name: {name!r} is not a {EXTENSION} file (pickled .ckpt/.pt files are refused)")
    try:
        return _resolve_listed(name)
    except ValueError:
        if _file_paths and _folder_paths() is None and not name.startswith(BUILTIN_PREFIX) and Path(name).is_file():
            return Path(name).resolve()
        raise


def _resolve_listed(name):
    if name.startswith(BUILTIN_PREFIX):
        roots, rel = [BUILTIN_DIR], name[len(BUILTIN_PREFIX):]
    else:
        roots, rel = _user_dirs(), name
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"ckpt_name: {name!r} must be a name from the list, not a path outside the model folders")
    for root in roots:
        try:
            path = (root / rel).resolve()
        except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13, then OSError
            raise ValueError(f"ckpt_name: {name!r} cannot be resolved in {root}: {error}") from None
        if path.is_file():
            if not path.is_relative_to(root):
                raise ValueError(f"ckpt_name: {name!r} resolves outside the model folder {root}")
            return path
    where = ", ".join(str(r) for r in roots) or "no model folder (use --models-dir)"
    raise ValueError(f"ckpt_name: no model {name!r} in {where}")


def model_file(name):
    """A model named on a command line: a builtin/ name, a .safetensors file's path (such as a training
    run's model.safetensors, which sits in no model folder), or a name from the model folders."""
    path = Path(name)
    if not name.startswith(BUILTIN_PREFIX) and path.suffix == EXTENSION and path.is_file():
        return path
    return resolve_model(name)

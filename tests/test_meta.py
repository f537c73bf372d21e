"""core/meta.py: modules whose weights are loaded anyway are built on the meta device without their
initialisation, which would import torch._dynamo (seconds of a CLI run's start) for nothing."""
import subprocess
import sys

import torch

from ldm_nodes.core.meta import empty_modules
from ldm_nodes.core.text import CLIPTextConfig, CLIPTextModel
from ldm_nodes.core.unet import UNetConfig, UNetModel

UNET = UNetConfig(4, 4, 32, (1, 2), 1, (1,), 1, 64, num_heads=2)
TEXT = CLIPTextConfig(vocab_size=1000, width=64, layers=1, heads=2, mlp_width=128)


def test_empty_modules_have_the_layout_and_load_by_assignment():
    for make in (lambda: UNetModel(UNET), lambda: CLIPTextModel(TEXT)):
        torch.manual_seed(0)
        real = make()
        with empty_modules():
            empty = make()
        assert all(p.is_meta for p in empty.parameters())
        assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
        empty.load_state_dict(real.state_dict(), strict=True, assign=True)
        assert all(torch.equal(a, b) for a, b in zip(empty.state_dict().values(), real.state_dict().values()))


def test_initialisation_outside_is_untouched():
    with empty_modules():
        pass
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4)
    assert not embedding.weight.is_meta and embedding.weight.std() > 0.5  # normal_ ran


def test_loading_a_model_does_not_import_torch_dynamo():
    code = ("import sys\nfrom ldm_nodes.core.checkpoint import load_checkpoint\n"
            "from ldm_nodes.nodes.model_paths import resolve_model\n"
            "load_checkpoint(resolve_model('builtin/tiny-shapes.safetensors'))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

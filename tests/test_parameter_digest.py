"""core/train_stages.parameter_digest: the fingerprint of a stage's frozen parts, kept in its saved state,
sees any change to the weights (a float sum did not see a permutation or edits that cancel), and a state
saved with the old float fingerprint is refused by name rather than taken for a run with other settings."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_nodes.core import train_loop
from ldm_nodes.core.errors import InputError
from ldm_nodes.core.train_stages import parameter_digest


def module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_equal_weights_give_equal_digests_and_it_is_a_sha256():
    a, b = module(), module()
    assert parameter_digest(a) == parameter_digest(b) == parameter_digest(copy.deepcopy(a))
    assert parameter_digest(a).startswith("sha256:") and len(parameter_digest(a)) == 7 + 64


def test_a_permutation_or_two_cancelling_edits_change_the_digest():
    base = module()
    permuted, cancelled, retyped = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        permuted[0].weight.copy_(base[0].weight.flip(0))  # the same numbers, the same sum, other places
        cancelled[0].weight[0, 0] += 0.25
        cancelled[1].weight[1, 2] -= 0.25  # the float sum is unchanged
        retyped.to(torch.float64)
    total = lambda m: float(sum(p.detach().double().sum() for p in m.parameters()))  # the old digest
    assert total(permuted) == pytest.approx(total(base), abs=1e-12)
    assert total(cancelled) == pytest.approx(total(base), abs=1e-12)
    digests = {parameter_digest(m) for m in (base, permuted, cancelled, retyped)}
    assert len(digests) == 4
    assert parameter_digest(base[0], base[1]) != parameter_digest(base[1], base[0])  # the order of the parts


def test_a_state_saved_with_the_old_float_digest_is_refused_naming_it(tmp_path):
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    ema = train_loop.EMA(net, 0.9)
    info = {"stage": "denoiser", "vae_digest": parameter_digest(net)}
    path = tmp_path / "denoiser-state.safetensors"
    old = {**info, "vae_digest": float(sum(p.detach().double().sum() for p in net.parameters()))}
    save_file({"model.net.weight": net.weight.detach().clone(), "model.net.bias": net.bias.detach().clone(),
               "ema.weight": net.weight.detach().clone(), "ema.bias": net.bias.detach().clone(),
               "rng": torch.Generator().get_state()}, path,
              metadata={"step": "1", "info": json.dumps(old), "history": json.dumps({"loss": []})})
    with pytest.raises(InputError, match="older version of the trainer.*vae_digest.*float sum.*delete it"):
        train_loop.load_state(str(path), {"net": net}, optimizer, ema, torch.Generator(), info)

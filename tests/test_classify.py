"""Zero-shot classification by the bound (core/classify.py).

Oracles: (1) pipeline.likelihood run for each prompt on its own with the same seed and steps (tested against
closed forms in test_likelihood.py): the paired, batched estimate must be that bound, term for term;
(2) the closed-form Gaussian denoiser of test_likelihood.py, one data mean per candidate, where the right
answer is the mean the data was drawn from and the spread of a paired difference over seeds is measured.
"""
import json
import math

import numpy as np
import pytest
import torch

from ldm_nodes.core.autoencoder import IdentityAutoencoder
from ldm_nodes.core.classify import classify, classify_bound, encode_candidates, paired_classification
from ldm_nodes.core.pipeline import DiffusionModel, likelihood
from ldm_nodes.core.schedule import TrainingSchedule
from ldm_nodes.core.unet import UNetConfig, UNetModel

SCHEDULE = TrainingSchedule("linear", 1000, 1e-4, 0.02)


def pixel_model():
    torch.manual_seed(0)
    net = UNetModel(UNetConfig(3, 3, 32, (1, 2), 1, (1,), 1, 32, num_head_channels=16)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.03)
    return DiffusionModel(net, SCHEDULE, "eps", 1.0, 3, True, None, torch.zeros(1, 77, 32))


def test_each_candidate_gets_the_bound_likelihood_gives_it_alone():
    model = pixel_model()
    contexts = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(5))
    image = torch.randint(0, 256, (1, 8, 8, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    result = classify(model, IdentityAutoencoder(), image, contexts, steps=6, seed=11)
    for c in range(3):
        alone = likelihood(model, IdentityAutoencoder(), image, contexts[c:c + 1], steps=6, seed=11)
        assert torch.equal(result.timesteps, alone.timesteps[0])
        torch.testing.assert_close(result.terms[c], alone.terms[0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(result.decoder[c], alone.decoder[0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(result.bounds[c], alone.total[0], rtol=1e-5, atol=0)
    assert result.unit == "bits/dim"
    assert result.ranking == sorted(range(3), key=lambda c: float(result.bounds[c]))


class MeanPerCandidate:
    """eps for the exact E[x0 | x_t] of data x0 ~ N(m, S^2) per dimension, m read from the context[:, 0, 0]:
    E[x0 | x_t] = m + g (x_t - sqrt(ab) m), g = sqrt(ab) S^2 / (ab S^2 + 1 - ab) (Gaussian conditioning)."""

    S = 0.5

    def __init__(self, alpha_bar):
        self.alpha_bar = alpha_bar

    def __call__(self, x_t, t, context):
        ab = self.alpha_bar[t.long()].reshape(-1, 1, 1, 1)
        m = context[:, 0, 0].reshape(-1, 1, 1, 1).double()
        x0 = m + ab.sqrt() * self.S ** 2 * (x_t - ab.sqrt() * m) / (ab * self.S ** 2 + 1 - ab)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


MEANS = (0.3, -0.2, 0.6)
TOY = TrainingSchedule("linear", 100, 1e-3, 0.1)


def toy(seed, x0, K=16, batch_size=256):
    schedule = TOY
    contexts = torch.tensor(MEANS, dtype=torch.float64).reshape(3, 1, 1).expand(3, 2, 2)
    net = MeanPerCandidate(schedule.alpha_bar)
    return classify_bound(net, x0, contexts, schedule, K, torch.Generator().manual_seed(seed), discrete=False,
                          batch_size=batch_size)


def test_the_mean_the_data_came_from_ranks_first_and_the_differences_have_their_stated_spread():
    wrong = 0
    for seed in range(100):  # images drawn from m = 0.3, against the answer of the exact log-likelihood
        x0 = 0.3 + 0.5 * torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        exact = min(range(3), key=lambda c: float((x0 - MEANS[c]).square().sum()))
        result = toy(seed, x0=x0)
        if result.ranking[0] != exact:  # rare, and then within the noise it reports
            wrong += 1
            assert result.bounds[exact] - result.bounds[result.ranking[0]] < 2 * result.standard_error[exact]
    assert wrong <= 3
    # one image, many seeds: the spread of the timestep part of a paired difference against its standard error
    x0 = 0.3 + 0.5 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    runs = [toy(seed, x0=x0) for seed in range(300)]
    T = 100
    diff = torch.stack([(T - 1) * (r.terms[2] - r.terms[0]).mean() for r in runs])
    stated = torch.stack([r.standard_error[2] for r in runs if r.ranking[0] == 0]) * x0.numel()
    assert 0.8 < float(stated.pow(2).mean().sqrt() / diff.std()) < 1.25
    assert all(float(r.standard_error[r.ranking[0]]) == 0 for r in runs)


def test_results_do_not_depend_on_how_the_pairs_are_batched():
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one, many = toy(3, x0, batch_size=1), toy(3, x0, batch_size=1000)
    torch.testing.assert_close(one.bounds, many.bounds, rtol=1e-12, atol=0)
    assert math.isclose(float(one.standard_error.sum()), float(many.standard_error.sum()), rel_tol=1e-12)


def test_refusals_name_the_input():
    schedule = TrainingSchedule("linear", 10, 1e-3, 0.1)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        classify_bound(lambda x, t, c: x, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1), schedule, 3, None, discrete=False)
    with pytest.raises(ValueError, match="timesteps"):
        classify_bound(lambda x, t, c: x, torch.zeros(1, 1, 2, 2), torch.zeros(2, 1, 1), schedule, 1, None, discrete=False)


# --- the command ---------------------------------------------------------------------------------------------

PROMPTS = ["a large blue circle in the center on a yellow background",
           "a large red circle in the center on a yellow background"]


@pytest.fixture
def never_load(monkeypatch):
    """Loading weights fails the test: a refusal must come before."""
    from ldm_nodes.core import checkpoint

    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was refused")
    monkeypatch.setattr(checkpoint, "load_checkpoint", load)


def write_png(path, size, mode="RGB"):
    from PIL import Image
    Image.new(mode, (size, size)).save(path)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["{png}", "--prompt", "a"], "--prompt: needs at least 2 candidate prompts, got 1"),
    (["{png}", "--prompt", "a", "--prompt", "a"], "the same prompt is given twice"),
    (["{dir}/typo.png", "--prompt", "a", "--prompt", "b"], "typo.png: no such file"),
    (["--prompt", "a", "--prompt", "b"], "IMAGE: give at least one image"),
    (["{small}", "--prompt", "a", "--prompt", "b"], "16x16, but this model was trained on 64x64"),
    (["{png}", "--prompt", "a", "--prompt", "b", "--steps", "1000"], "--steps: 1000: 2..999"),
    (["{png}", "--prompt", "a", "--prompt", "b", "--model", "nope.safetensors"], "--model:"),
    (["{png}", "--prompt", "a", "--prompt", "b", "--json", "{dir}/no/such/out.json"], "--json:"),
    (["--batch", "{batch}"], "line 2: expected {\"image\": path"),
    (["--batch", "{batch}", "{png}"], "--batch: takes the images and prompts from the file"),
])
def test_classify_command_refuses_bad_input_in_one_line_before_loading(args, message, tmp_path, capsys, never_load):
    from ldm_nodes.cli import main
    png, small = write_png(tmp_path / "a.png", 64), write_png(tmp_path / "small.png", 16)
    batch = tmp_path / "q.jsonl"
    batch.write_text(json.dumps({"image": "a.png", "prompts": ["a", "b"]}) + "\n" + json.dumps({"image": "a.png"}))
    args = [a.format(png=png, small=small, dir=tmp_path, batch=batch) for a in args]
    assert main(["classify", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_classify_command_ranks_and_writes_json(tmp_path, capsys):
    from PIL import Image

    from ldm_nodes.cli import main
    from ldm_nodes.core.data import COLOR_RGB
    image = Image.new("RGB", (32, 32), COLOR_RGB["yellow"])
    image.paste(COLOR_RGB["blue"], (6, 6, 26, 26))
    image.save(tmp_path / "blue.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "blue.png", "prompts": PROMPTS[::-1]}) + "\n")
    out = tmp_path / "out.json"
    model = "builtin/tiny-shapes-pixel.safetensors"
    assert main(["classify", "--batch", str(tmp_path / "q.jsonl"), "--model", model, "--steps", "8",
                 "--json", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert "network calls" in err and "bits/dim" in stdout
    report = json.loads(out.read_text())
    assert report["model"] == model and len(report["images"]) == 1
    row = report["images"][0]
    assert row["image"] == str(tmp_path / "blue.png") and row["prompts"] == PROMPTS[::-1]
    assert len(row["bounds"]) == 2 and all(math.isfinite(b) for b in row["bounds"])
    assert row["ranking"] == sorted(row["prompts"], key=lambda p: row["bounds"][row["prompts"].index(p)])


def test_node_answers_the_core_s_best_prompt_with_a_plot():
    from ldm_nodes.nodes import LDMClassify, LDMLoadModel
    model, text_encoder, vae = LDMLoadModel().load("builtin/tiny-shapes-pixel.safetensors", "auto")
    image = torch.zeros(1, 32, 32, 3)
    image[..., :2] = 0.9
    prompts = PROMPTS + [p.replace("circle", "square") for p in PROMPTS]
    best, plot = LDMClassify().classify(image, model, text_encoder, vae, "\n" + "\n".join(prompts) + "\n\n", 4, 9)
    contexts = encode_candidates(text_encoder.get(), prompts)
    expected = classify(model.get(), vae.get(), image, contexts, 4, 9)
    assert best == prompts[expected.ranking[0]]
    assert plot.shape == (1, 400, 640, 3) and plot.dtype == torch.float32 and 0 <= plot.min() and plot.max() <= 1
    with pytest.raises(ValueError, match="prompts: the same prompt is given twice"):
        LDMClassify().classify(image, model, text_encoder, vae, "a\na", 4, 9)
    with pytest.raises(ValueError, match="image: a batch of 2: classification takes one image at a time"):
        LDMClassify().classify(image.expand(2, -1, -1, -1), model, text_encoder, vae, "a\nb", 4, 9)
    with pytest.raises(ValueError, match="prompts: needs at least 2 candidate prompts, got 1"):
        LDMClassify().classify(image, model, text_encoder, vae, "a\n", 4, 9)


def test_pairs_per_call_shrink_to_the_memory_available(monkeypatch):
    from ldm_nodes.core import classify as module
    from ldm_nodes.core.memory import estimate_peak
    network = pixel_model().network
    shape = (1, 3, 32, 32)
    fits_16 = estimate_peak("sample", network, (16, 3, 32, 32), context_tokens=77)  # a call of 32 pairs
    monkeypatch.setattr(module, "available_memory", lambda device: (2 * fits_16, "test"))
    assert module.pairs_per_call(network, shape, 77) == 32
    monkeypatch.setattr(module, "available_memory", lambda device: (None, "test"))
    assert module.pairs_per_call(network, shape, 77) == 256


def test_the_builtin_model_classifies_scenes_it_never_saw_drawn_by_another_renderer():
    """A small bench/classify.py: scenes of tools/other_scenes.py (not the training renderer), default settings."""
    from ldm_nodes.core.checkpoint import load_checkpoint
    from ldm_nodes.core.classify import DEFAULT_STEPS
    from ldm_nodes.core.pipeline import DiffusionModel, TextEncoder
    from ldm_nodes.core.text import CLIPTokenizer
    from ldm_nodes.nodes.model_paths import model_file
    from ldm_nodes.tools.other_scenes import questions

    checkpoint = load_checkpoint(model_file("builtin/tiny-shapes.safetensors"))
    model = DiffusionModel.from_checkpoint(checkpoint)
    text_encoder = TextEncoder(checkpoint.text_encoder, CLIPTokenizer())
    right = []
    for image, truth, candidates in questions(8, seed=7):
        contexts = encode_candidates(text_encoder, candidates)
        pixels = torch.from_numpy(image.copy())[None].float() / 255
        result = classify(model, checkpoint.vae, pixels, contexts, DEFAULT_STEPS, 0)
        right.append(candidates[result.ranking[0]] == truth)
    assert all(right[:4]), right  # colour, 4 candidates
    assert sum(right[4:]) >= 3, right  # shape, 3 candidates


def test_the_other_renderer_keeps_the_grammar_s_sizes_and_places():
    """tools/other_scenes.py's shapes span their size word's range (+- 1 px of anti-aliasing), never touch the
    canvas edge, and lie on the side their position word names."""
    from ldm_nodes.core.data import SIZE_SPANS
    from ldm_nodes.tools.other_scenes import PALETTE, questions

    for image, truth, _ in questions(60, seed=3):
        words = truth.split()
        background = PALETTE[words[-2]]
        ys, xs = np.nonzero(np.abs(image.astype(int) - background).sum(-1) > 60)
        low, high = SIZE_SPANS[words[1]]
        assert low - 1 <= max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) <= high + 1, truth
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63, truth
        middle = {"left": (xs.max() + xs.min()) / 2 < 24, "right": (xs.max() + xs.min()) / 2 > 40,
                  "top": (ys.max() + ys.min()) / 2 < 24, "bottom": (ys.max() + ys.min()) / 2 > 40}
        assert words[6] == "center" or middle[words[6]], truth


def test_candidates_scored_one_by_one_with_one_seed_classify_as_in_one_batch():
    """paired_classification of per-candidate likelihood() bounds (what LDMComfyClassify does, candidate by
    candidate through the host) equals classify() of the same candidates, seed and steps in one batch."""
    model, vae = pixel_model(), IdentityAutoencoder()
    contexts = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(7))
    image = torch.randint(0, 256, (1, 8, 8, 3), generator=torch.Generator().manual_seed(1)).float() / 255
    batch = classify(model, vae, image, contexts, steps=8, seed=5)
    single = [likelihood(model, vae, image, contexts[c:c + 1], steps=8, seed=5) for c in range(len(contexts))]
    one_by_one = paired_classification(single, model.schedule.num_timesteps)
    assert one_by_one.ranking == batch.ranking and one_by_one.unit == batch.unit
    torch.testing.assert_close(one_by_one.bounds, batch.bounds, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one_by_one.standard_error, batch.standard_error, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(one_by_one.timesteps, batch.timesteps)
    other_seed = likelihood(model, vae, image, contexts[:1], steps=8, seed=6)
    with pytest.raises(ValueError, match="different timesteps"):
        paired_classification([single[1], other_seed], model.schedule.num_timesteps)

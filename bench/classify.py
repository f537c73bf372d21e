"""Zero-shot classification by the bound on scenes no model was trained on, and what it costs.

    python bench/classify.py [--model builtin/tiny-shapes.safetensors] [--questions 48] [--steps K] [--seed 0]

The scenes are drawn by tools/other_scenes.py, a renderer independent of core/data.py's (the training
data's), with its own palette and drawing: half 4-way colour questions, half 3-way shape questions, the
other words of the caption shared. Each is classified as `python -m ldm_nodes classify` does (core/classify.py,
the default steps and seed), and the share ranked right is printed per kind, with the wall time of all of
them, the process's CPU time (a bound on the wall time when nothing else runs) and the machine's load average
(the CPU may be shared: wall times swing with it).

Also printed, from the same network outputs: the ranking by the uniform eps-error, Li et al.'s choice, which
drops the bound's weight lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) of each term (DDPM
eq. 12; sigma_t^2 = beta_tilde_t here, where the term is exactly lambda_t ||eps - eps_theta||^2) and L_0.
"""
import argparse
import os
import sys
import time

import torch

from ldm_nodes.core.checkpoint import load_checkpoint
from ldm_nodes.core.classify import DEFAULT_STEPS, classify, encode_candidates
from ldm_nodes.core.pipeline import DiffusionModel, TextEncoder
from ldm_nodes.core.text import CLIPTokenizer
from ldm_nodes.nodes.model_paths import model_file
from ldm_nodes.tools.other_scenes import questions


def elbo_weight(schedule, i):
    """lambda_t at array indices i >= 1 with sigma_t^2 = beta_tilde_t."""
    ab = schedule.alpha_bar.double()
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])[i]
    alpha = ab[i] / ab_prev
    beta = 1 - alpha
    sigma2 = (1 - ab_prev) / (1 - ab[i]) * beta
    return beta**2 / (2 * sigma2 * alpha * (1 - ab[i]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-shapes.safetensors")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0, help="the classification's seed (the scenes' is fixed)")
    args = parser.parse_args()
    checkpoint = load_checkpoint(model_file(args.model))
    model = DiffusionModel.from_checkpoint(checkpoint)
    text_encoder = TextEncoder(checkpoint.text_encoder, CLIPTokenizer())
    asked = questions(args.questions, seed=2026)
    load = os.getloadavg()
    print(f"{args.model}: {len(asked)} questions, {args.steps} timesteps, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} at the start", flush=True)
    right = {"colour": [0, 0], "shape": [0, 0]}
    eps_right = {"colour": 0, "shape": 0}
    start, cpu_start = time.perf_counter(), time.process_time()
    for k, (image, truth, candidates) in enumerate(asked):
        kind = "colour" if k < len(asked) // 2 else "shape"
        contexts = encode_candidates(text_encoder, candidates)
        pixels = torch.from_numpy(image.copy())[None].float() / 255
        result = classify(model, checkpoint.vae, pixels, contexts, args.steps, args.seed)
        truth_index = candidates.index(truth)
        right[kind][0] += result.ranking[0] == truth_index
        right[kind][1] += 1
        eps_error = (result.terms / elbo_weight(model.schedule, result.timesteps)).mean(1)
        eps_right[kind] += int(eps_error.argmin()) == truth_index
        if result.ranking[0] != truth_index:
            print(f"  miss {k}: {truth!r} ranked {result.ranking.index(truth_index) + 1}, "
                  f"+{float(result.bounds[truth_index] - result.bounds[result.ranking[0]]):.4f} "
                  f"+- {float(result.standard_error[truth_index]):.4f}", flush=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    for kind, (hits, n) in right.items():
        print(f"{kind}: {hits}/{n} = {100 * hits / max(n, 1):.1f} % ranked first by the bound "
              f"({100 * eps_right[kind] / max(n, 1):.1f} % by the uniform eps-error)")
    print(f"{seconds:.1f} s for {len(asked)} questions ({seconds / len(asked):.2f} s each), {cpu_seconds:.1f} s of "
          f"CPU time (idle, the wall time is at most this); load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

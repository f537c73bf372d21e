"""core/text.py: tokenizer and CLIP text encoder against transformers, prompt weighting by hand."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gzip
import hashlib
import random

import pytest
import torch

from ldm_nodes.tools.randomise import randomise
from ldm_nodes.core.text import (
    BOS_ID, EOS_ID, N_MERGES, VOCAB_PATH, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, encode_prompt,
    infer_text_config, parse_weights, tokenize_weighted,
)

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with BOS/EOS (SD_REFERENCE 6)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


# ---------------------------------------------------------------------------------------------
# Vocabulary file and tokenizer


def test_vocab_file_is_openai_clip_and_licensed():
    assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    notice = VOCAB_PATH.with_name("bpe_simple_vocab_16e6.LICENSE").read_text()
    assert "Copyright (c) 2021 OpenAI" in notice and "MIT License" in notice


def test_vocab_layout(tok):
    v = tok.vocab
    assert len(v) == 49408
    assert (v["!"], v["a"], v["a</w>"], v["in"]) == (0, 64, 320, 512)
    assert (v["<|startoftext|>"], v["<|endoftext|>"]) == (BOS_ID, EOS_ID)


@pytest.fixture(scope="module")
def hf_tok(tok):
    """transformers' CLIPTokenizer over the same file: vocab = our token -> id table, merges =
    lines 1..48894 as 2-tuples (never vocab_file=, which silently gives a placeholder vocab)."""
    transformers = pytest.importorskip("transformers")
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:N_MERGES + 1]]
    hf = transformers.CLIPTokenizer(vocab=dict(tok.vocab), merges=merges)
    assert hf("a photo of a cat")["input_ids"] == CAT  # the oracle itself is sane
    return hf


WORDS = ("a photo of cat dog portrait masterpiece best quality highly detailed landscape sunset "
         "over mountains oil painting by greg rutkowski trending on artstation octane render "
         "cinematic lighting ultra sharp focus bokeh wide angle lens hyperrealistic").split()
PUNCT = list(",.!?:;\"#@&*+=/\\|~`^%$<>_-[]{}()") + ["...", "--", "!!", "?!", ",,", "_-_", "->", "::"]
NUMBERS = ["8k", "4K", "1920x1080", "3.14", "2024", "v1.5", "1st", "50%", "$100", "0.5", "007", "2x"]
APOSTROPHES = ["it's", "don't", "they're", "I've", "I'm", "we'll", "he'd", "IT'S", "'quoted'",
               "rock'n'roll", "o'clock", "'", "''s", "'S", "We'RE", "dogs'"]
UNICODE = ["café", "naïve", "Straße", "ß", "Москва", "привет", "東京", "猫", "日本語", "한국어",
           "🐱", "👍🏽", "❤️", "😀😃", "Ωμέγα", "ΟΔΟΣ", "½", "Ⅻ", "x²", "١٢٣", "İstanbul", "ﬁne",
           "Ａｂｃ", "e\u0301", "\u00e9", "ǅ", "ℌ", "zero\u200bwidth", "unit\x1fsep", "العربية",
           "हिन्दी", "ไทย", "¡hola!", "©2023", "x\u0300\u0301", "\U0001f600x"]
SPECIAL = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|", "<|end"]
HTML = ["&amp;", "&lt;tag&gt;", "cafÃ©", "&#39;s"]  # transformers 5 does no unescaping/ftfy either
SPACES = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\u00a0", "\u3000", "\u2009", "\r\n", ""]
POOLS = [WORDS, WORDS, PUNCT, NUMBERS, APOSTROPHES, UNICODE, SPECIAL, HTML]


def _prompts(n=300, seed=0):
    rng = random.Random(seed)
    prompts = ["", "   ", "a photo of a cat", "A PHOTO OF A CAT", "8k", "1920x1080"]
    for i in range(n):
        count = rng.randint(1, 12) if i % 50 else rng.randint(150, 300)  # some very long prompts
        parts = []
        for _ in range(count):
            p = rng.choice(rng.choice(POOLS))
            p = rng.choice([p, p, p.upper(), p.title()])
            parts += [p, rng.choice(SPACES)]
        prompts.append("".join(parts))
    return prompts


def test_tokenizer_matches_transformers(tok, hf_tok):
    prompts = _prompts()
    expected = hf_tok(prompts, add_special_tokens=False)["input_ids"]  # unpadded, untruncated
    mismatches = [(p, a, b) for p, a, b in zip(prompts, (tok.encode(p) for p in prompts), expected) if a != b]
    assert not mismatches, mismatches[:3]
    assert max(map(len, expected)) > 300  # the long prompts really were long


def test_tokenizer_cases(tok):
    assert tok.encode("a photo of a cat") == CAT[1:-1]
    assert tok.encode("8k") == [tok.vocab["8</w>"], tok.vocab["k</w>"]]  # digits are single pieces
    assert tok.encode("x<|endoftext|>") == [tok.vocab["x</w>"], EOS_ID]
    assert tok.encode("") == tok.encode(" \t\n") == []


# ---------------------------------------------------------------------------------------------
# ComfyUI prompt weighting


def test_parse_weights():
    assert parse_weights("a (b:1.2) c") == [("a ", 1.0), ("b", 1.2), (" c", 1.0)]
    assert parse_weights("(cat: 0.5)") == [("cat", 0.5)]
    [(text, w)] = parse_weights("((a))")
    assert text == "a" and w == pytest.approx(1.21)
    assert parse_weights("((a:1.5))") == [("a", 1.5)]  # an explicit weight replaces, not multiplies
    assert parse_weights("(a:0) b") == [("a", 0.0), (" b", 1.0)]
    assert parse_weights("((a):1.5)") == [("a", pytest.approx(1.65))]
    assert parse_weights("(e (f) g:0.5)") == [("e ", 0.5), ("f", pytest.approx(0.55)), (" g", 0.5)]


def test_parse_weights_escapes_and_literals():
    assert parse_weights(r"\(a\) (b)") == [("(a) ", 1.0), ("b", pytest.approx(1.1))]
    assert parse_weights(r"(\(a\))") == [("(a)", pytest.approx(1.1))]
    # unbalanced parentheses and non-numbers after the colon are text
    assert parse_weights("a) (b") == [("a) (b", 1.0)]
    assert parse_weights("(a:b)") == [("a:b", pytest.approx(1.1))]
    assert parse_weights("(:2)") == [(":2", pytest.approx(1.1))]
    assert parse_weights("(a:nan)") == [("a:nan", pytest.approx(1.1))]


def test_tokenize_weighted_one_chunk(tok):
    ids, weights = tokenize_weighted(tok, "a (cat:1.2)")
    assert ids.dtype == torch.long and weights.dtype == torch.float32
    assert ids.tolist() == [[BOS_ID, 320, 2368, EOS_ID] + [EOS_ID] * 73]
    assert weights[0, :4].tolist() == pytest.approx([1, 1, 1.2, 1]) and (weights[0, 4:] == 1).all()
    ids, _ = tokenize_weighted(tok, "a cat", pad_id=0)  # SD2 pads with 0
    assert ids[0, :4].tolist() == [BOS_ID, 320, 2368, EOS_ID] and (ids[0, 4:] == 0).all()
    # Unlike ComfyUI we do not look "A</w>" up in the vocabulary (a never-trained upper-case
    # token, id 288): every word goes through the tokenizer, so "A" is "a" (320).
    assert tokenize_weighted(tok, "A cat")[0][0, 1].item() == 320


def test_empty_prompt_ids(tok):
    ids, weights = tokenize_weighted(tok, "")
    assert ids.tolist() == [[BOS_ID, EOS_ID] + [EOS_ID] * 75]
    assert (weights == 1).all()


def test_chunking_moves_short_words_and_splits_long_ones(tok):
    # Each digit is one token, so a run of n digits is a word of n tokens.
    long_word = "1234567890" * 2
    prompt = " ".join(["cat"] * 73 + ["12345"] + ["cat"] * 60 + [f"({long_word}:1.5)"] + ["cat"] * 42)
    ids, weights = tokenize_weighted(tok, prompt)
    assert ids.shape == weights.shape == (3, 77)
    cat, digits = 2368, [tok.vocab[f"{d}</w>"] for d in long_word]
    # chunk 1: 73 cats; "12345" (5 tokens) would straddle, so it moved whole; EOS, one pad
    assert ids[0].tolist() == [BOS_ID] + [cat] * 73 + [EOS_ID, EOS_ID, EOS_ID]
    # chunk 2: "12345", 60 cats, then the first 10 tokens of the 20-token word, which is split
    assert ids[1].tolist() == [BOS_ID] + digits[:5] + [cat] * 60 + digits[:10] + [EOS_ID]
    assert ids[2].tolist() == [BOS_ID] + digits[10:] + [cat] * 42 + [EOS_ID] + [EOS_ID] * 23
    assert (weights[1, 66:76] == 1.5).all() and (weights[2, 1:11] == 1.5).all()
    assert (weights[1, :66] == 1).all() and (weights[2, 11:] == 1).all()


@pytest.mark.parametrize("length, moves", [(7, True), (8, False)])
def test_straddling_word_threshold(tok, length, moves):
    ids, _ = tokenize_weighted(tok, " ".join(["cat"] * 70 + ["1" * length]))
    assert ids.shape[0] == 2
    assert (ids[0, 71].item() == EOS_ID) == moves  # moved: chunk 1 ends after the 70 cats
    assert (ids[1, 1:1 + length] == tok.vocab["1</w>"]).sum().item() == (length if moves else length - 5)


# ---------------------------------------------------------------------------------------------
# The text transformer against transformers' CLIPTextModel


def _tiny(activation="quick_gelu", vocab_size=49408):
    return CLIPTextConfig(vocab_size=vocab_size, width=64, layers=3, heads=4, mlp_width=256,
                          max_positions=77, activation=activation)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(tok, activation):
    transformers = pytest.importorskip("transformers")
    c = _tiny(activation)
    ours = randomise(CLIPTextModel(c))
    hf_config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.max_positions,
        hidden_act=activation, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        attn_implementation="eager")
    hf = transformers.CLIPTextModel(hf_config).eval()
    # transformers >= 5.6 flattened CLIPTextModel: its own keys have no "text_model." prefix.
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}, strict=True)

    ids = torch.cat([tokenize_weighted(tok, p)[0] for p in ["a photo of a cat", "", "8k, (red:1.3) dog"]])
    random_ids = torch.randint(0, c.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([ids, random_ids])
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        for layer in (-1, -2, -3):
            expected = out.last_hidden_state if layer == -1 else hf.final_layer_norm(out.hidden_states[layer])
            got = ours(ids, layer)
            assert got.shape == (5, 77, 64)
            assert (got - expected).abs().max().item() <= 1e-4, layer
    assert expected.std() > 0.1  # not a trivially flat output


def test_layer_out_of_range():
    model = CLIPTextModel(_tiny(vocab_size=100))
    ids = torch.zeros(1, 77, dtype=torch.long)
    for layer in (0, -4, 1):
        with pytest.raises(ValueError, match="layer"):
            model(ids, layer)


# ---------------------------------------------------------------------------------------------
# Config inference from checkpoint shapes


def test_infer_text_config_sd15(sd15_shapes):
    prefix = "cond_stage_model.transformer."
    file_shapes = {k: v for k, v in sd15_shapes.items() if k.startswith(prefix)}
    # Old checkpoints also store the buffer text_model.embeddings.position_ids [1, 77] (this list
    # does not); we ignore it and use arange(n), so it is no part of our state dict.
    file_shapes.pop(prefix + "text_model.embeddings.position_ids", None)
    c = infer_text_config({k[len(prefix):]: v for k, v in file_shapes.items()})
    assert c == CLIPTextConfig(vocab_size=49408, width=768, layers=12, heads=12, mlp_width=3072,
                               max_positions=77, activation="quick_gelu")
    with torch.device("meta"):
        model = CLIPTextModel(c)
    ours = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == file_shapes and len(ours) == 196
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # SD_REFERENCE 1.1


def test_config_round_trip_and_validation():
    c = _tiny("gelu")
    assert CLIPTextConfig.from_dict(c.to_dict()) == c
    assert c.to_dict() == dict(vocab_size=49408, width=64, layers=3, heads=4, mlp_width=256,
                               max_positions=77, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig(activation="relu")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=64, heads=5)


def _tiny_shapes():
    return {k: tuple(v.shape) for k, v in CLIPTextModel(_tiny(vocab_size=100)).state_dict().items()}


def test_infer_text_config_small_and_heads():
    shapes = _tiny_shapes()
    assert infer_text_config(shapes) == CLIPTextConfig(vocab_size=100, width=64, layers=3, heads=1,
                                                       mlp_width=256, max_positions=77)
    assert infer_text_config(shapes, heads=4).heads == 4


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.pop("text_model.embeddings.token_embedding.weight"), "token_embedding"),
    (lambda s: s.update({"text_model.embeddings.token_embedding.weight": (100,)}), "token_embedding"),
    (lambda s: s.pop("text_model.embeddings.position_embedding.weight"), "position_embedding"),
    (lambda s: s.update({"text_model.embeddings.position_embedding.weight": (77, 32)}), "position_embedding"),
    (lambda s: [s.pop(k) for k in list(s) if ".layers.1." in k], "layers.1.mlp.fc1"),
    (lambda s: [s.pop(k) for k in list(s) if ".layers." in k], "layers.0.mlp.fc1"),
    (lambda s: s.pop("text_model.final_layer_norm.weight"), "final_layer_norm"),
])
def test_infer_text_config_garbage(edit, key):
    shapes = _tiny_shapes()
    edit(shapes)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        infer_text_config(shapes)


# ---------------------------------------------------------------------------------------------
# encode_prompt


@pytest.fixture(scope="module")
def tiny_model():
    return randomise(CLIPTextModel(_tiny()), seed=2)


@torch.no_grad()
def test_encode_prompt_chunks(tok, tiny_model):
    prompt = " ".join(["cat"] * 100)
    z = encode_prompt(tok, tiny_model, prompt)
    assert z.shape == (1, 154, 64)
    ids, _ = tokenize_weighted(tok, prompt)
    assert torch.allclose(z[0, 77:], tiny_model(ids[1:2])[0], atol=1e-6)  # each chunk on its own
    z2 = encode_prompt(tok, tiny_model, prompt, layer=-2)
    assert torch.allclose(z2[0, :77], tiny_model(ids[:1], -2)[0], atol=1e-6)
    assert (z2 - z).abs().max() > 1e-3


@torch.no_grad()
def test_encode_prompt_unit_weights_are_plain(tok, tiny_model):
    plain = encode_prompt(tok, tiny_model, "a red cat")
    assert torch.equal(encode_prompt(tok, tiny_model, "a (red:1.0) cat"), plain)
    assert torch.equal(plain[0], tiny_model(tokenize_weighted(tok, "a red cat")[0])[0])


@torch.no_grad()
def test_encode_prompt_weighting_formula(tok, tiny_model):
    prompt = " ".join(["cat"] * 80) + " (red:1.5) ((dog))"  # the weighted words land in chunk 2
    z = encode_prompt(tok, tiny_model, prompt)
    ids, _ = tokenize_weighted(tok, prompt)
    plain = tiny_model(ids).reshape(1, 154, 64)
    z_empty = tiny_model(tokenize_weighted(tok, "")[0])[0]  # [77, 64], the same for every chunk
    expected = plain.clone()
    red, dog = 77 + 1 + 5, 77 + 1 + 6  # BOS of chunk 2, then 5 cats
    expected[0, red] = (plain[0, red] - z_empty[red - 77]) * 1.5 + z_empty[red - 77]
    expected[0, dog] = (plain[0, dog] - z_empty[dog - 77]) * 1.21 + z_empty[dog - 77]
    assert torch.allclose(z, expected, atol=1e-6, rtol=0)
    assert (z[0, red] - plain[0, red]).abs().max() > 1e-3  # the weight did something
    assert torch.equal(z[0, :red], plain[0, :red]) and torch.equal(z[0, dog + 1:], plain[0, dog + 1:])


@torch.no_grad()
def test_empty_prompt_is_a_real_encoding(tok, tiny_model):
    z = encode_prompt(tok, tiny_model, "")
    assert z.shape == (1, 77, 64)
    assert z.abs().amax(dim=-1).min() > 0.1  # every position is a real vector, not zeros
    assert torch.equal(z[0], tiny_model(torch.tensor([[BOS_ID] + [EOS_ID] * 76]))[0])

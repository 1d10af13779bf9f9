"""The runtime's CLIP tokenizer against transformers' CLIPTokenizer, for both pad conventions."""
from __future__ import annotations

import json
import random
import shutil
import warnings

import numpy as np
import pytest
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from runtimes.tokenizer import CLIPTokenizer

BASE = [
    "A photo of a cat, wearing a HAT",
    "",
    " ",
    "a   lot\tof\n\nwhitespace   ",
    "UPPER lower MiXeD CaSe",
    "numbers 1234567890 3.14159 1e-6 42nd 100%",
    "punctuation!!! ?? ... ;; :: -- __ ++ == ## @@ $$ ^^ && ** (( )) [[ ]] {{ }} <<>> // \\\\ || ~~ `` ''",
    "don't can't won't it's we're they've I'm you'll he'd",
    "quotes \"double\" 'single' «guillemets» „low“",
    "café naïve résumé façade coöperate Ångström",
    "Straße ßtraße ǅungla İstanbul ΣΊΣΥΦΟΣ",
    "日本語のテキスト 中文文本 한국어 텍스트",
    "emoji 🐱🎩 👩‍👩‍👧‍👦 🇫🇷 ❤️ 👍🏽",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ﬁ ligature",
    "combining e\u0301 vs precomposed é, NFC matters",
    "zero\u200bwidth\u200bspace and non\u00a0breaking",
    "math ∑∫√∞ ≤≥≠ ½ ¼ ² ³",
    "arabic العربية hebrew עברית hindi हिन्दी thai ภาษาไทย",
    "<|startoftext|> inside <|endoftext|> the prompt",
    "exclamation! pad-token! convention!",
    "a" * 300,
    " ".join(["very long prompt"] * 40),
    "tab\tand\rcarriage return",
    "URL https://example.com/path?query=1&x=2 and email me@example.org",
    "#hashtag @mention snake_case kebab-case camelCase",
]


def _prompts(count: int = 240) -> list[str]:
    rng = random.Random(0)
    words = [w for p in BASE for w in p.split()] + ["🐶", "ÉCOLE", "x86_64", "3D", "4K", "!", "?!", "re-mask", "Ⅻ"]
    prompts = list(BASE)
    while len(prompts) < count:
        n = rng.randint(1, 30)
        joiners = [" ", "  ", ", ", "\n", "-", ""]
        prompts.append("".join(rng.choice(words) + rng.choice(joiners) for _ in range(n)))
    return prompts


@pytest.fixture(params=["<|endoftext|>", "!"], ids=["pad-eos", "pad-bang"])
def tokenizer_dir(request, golden_checkpoint, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(golden_checkpoint / "tokenizer", folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        path.chmod(0o644)
        path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": request.param}))
    return folder


def test_identical_to_transformers(tokenizer_dir):
    reference = TransformersCLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ours = CLIPTokenizer(tokenizer_dir)
    prompts = _prompts()
    assert len(prompts) >= 200
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual = ours(prompts)
    assert ours.pad_id == reference.pad_token_id
    mismatched = [p for p, a, e in zip(prompts, actual, expected) if not np.array_equal(a, e)]
    assert not mismatched, mismatched[:5]


def test_truncation_warns(tokenizer_dir):
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ids = CLIPTokenizer(tokenizer_dir)(["word " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab.json: file not found"):
        CLIPTokenizer(tmp_path)

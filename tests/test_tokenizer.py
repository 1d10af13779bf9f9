"""The runtime's CLIP tokenizer against transformers' CLIPTokenizer, for both pad conventions, on the
port kit's prompts (edge cases of unicode, emoji, whitespace and length, and prompts stitched from them)."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from meissonic.runtimes.tokenizer import CLIPTokenizer
from meissonic_export.port_kit import tokenizer_prompts


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
    prompts = tokenizer_prompts()
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

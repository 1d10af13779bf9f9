"""CLIP tokenizer from a bundle's tokenizer files, with the `tokenizers` library (no torch, no transformers).

Built the way transformers' `CLIPTokenizer` builds its backend (byte-level BPE with `</w>` word ends;
NFC, whitespace collapsing and lower-casing; CLIP's split pattern), with the checkpoint's special
tokens registered the same way, so ids are identical for either pad convention (`<|endoftext|>` or
`!`, id 0). Output: exactly 77 ids per prompt, `<|startoftext|> ... <|endoftext|>` then padding.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

CONTEXT_LENGTH = 77
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used; the message names the file."""


def _token_text(value) -> str:
    return value["content"] if isinstance(value, dict) else value


class CLIPTokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        files = {name: folder / name for name in ("vocab.json", "merges.txt", "tokenizer_config.json")}
        for path in files.values():
            if not path.is_file():
                raise TokenizerError(f"{path}: file not found")
        try:
            config = json.loads(files["tokenizer_config.json"].read_text())
            special_map = folder / "special_tokens_map.json"
            special = {**config, **(json.loads(special_map.read_text()) if special_map.is_file() else {})}
            vocab, merges = BPE.read_file(str(files["vocab.json"]), str(files["merges.txt"]))
        except Exception as error:  # noqa: BLE001 (json and tokenizers raise their own types)
            raise TokenizerError(f"{folder}: unreadable tokenizer files ({error})") from None
        self.bos, self.eos = _token_text(special.get("bos_token", "<|startoftext|>")), _token_text(special.get("eos_token", "<|endoftext|>"))
        unk, pad = _token_text(special.get("unk_token", self.eos)), _token_text(special.get("pad_token", self.eos))
        self.backend = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        self.backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        # transformers registers these as special added tokens: they match before normalisation, so a
        # prompt that contains the pad text "!" gets the pad id, exactly as with transformers.
        self.backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys([self.bos, self.eos, unk, pad])])
        self.bos_id, self.eos_id, self.pad_id = (self.backend.token_to_id(t) for t in (self.bos, self.eos, pad))

    def token_text(self, token_id: int) -> str:
        """The text of one id, without BPE's end-of-word mark."""
        return self.backend.id_to_token(token_id).removesuffix("</w>")

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """-> int64 [len(prompts), 77]; prompts longer than 75 tokens are truncated with a warning."""
        ids = np.full((len(prompts), CONTEXT_LENGTH), self.pad_id, dtype=np.int64)
        for row, encoding in zip(ids, self.backend.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > CONTEXT_LENGTH - 2:
                warnings.warn(f"prompt truncated to {CONTEXT_LENGTH} tokens ({len(tokens) + 2} given)", stacklevel=2)
                tokens = tokens[: CONTEXT_LENGTH - 2]
            row[: len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
        return ids

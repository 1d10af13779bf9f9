"""The committed port kit (docs/port_kit) checked against implementations other than the one that wrote
it: PCG64 and numpy's SeedSequence written out here in plain Python integers from their published
definitions, torch's linspace and the reference scheduler's float32 mask ratio, transformers' CLIP
tokenizer, and the sampler's re-masking redone from the kit's own arrays alone, as a port would.
(That the kit is what `meissonic-export port-kit` writes today is checked in test_shapes.py, which has
the shapes bundle.)"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from meissonic.reference.scheduler import mask_ratio

ROOT = Path(__file__).parent.parent
KIT, ASSETS = ROOT / "docs" / "port_kit", ROOT / "reference" / "assets"
MASK32, MASK64, MASK128 = (1 << 32) - 1, (1 << 64) - 1, (1 << 128) - 1


def _json(name: str) -> dict:
    return json.loads((KIT / name).read_text())


def _array(ref: dict) -> np.ndarray:
    return np.fromfile(KIT / ref["file"], dtype=np.dtype(ref["dtype"]).newbyteorder("<")).reshape(ref["shape"])


def _bits(values: np.ndarray) -> list[str]:
    return [f"0x{int(b):08x}" for b in np.asarray(values, dtype="<f4").view("<u4").ravel()]


# -- numpy's SeedSequence (bit_generator.pyx) and PCG64 XSL-RR 128/64 (pcg64.h), from their definitions --
def _hashmix(value: int, hash_const: list[int]) -> int:
    value ^= hash_const[0]
    hash_const[0] = (hash_const[0] * 0x931E8875) & MASK32
    value = (value * hash_const[0]) & MASK32
    return value ^ (value >> 16)


def _mix(x: int, y: int) -> int:
    result = (0xCA01F9DD * x - 0x4973F715 * y) & MASK32
    return result ^ (result >> 16)


def seed_sequence_uint64(seed: int, words: int = 4) -> list[int]:
    entropy = [(seed >> (32 * i)) & MASK32 for i in range(max(1, (seed.bit_length() + 31) // 32))]
    pool, hash_const = [0] * 4, [0x43B0D7E5]
    for i in range(4):
        pool[i] = _hashmix(entropy[i] if i < len(entropy) else 0, hash_const)
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], hash_const))
    for src in range(4, len(entropy)):
        for dst in range(4):
            pool[dst] = _mix(pool[dst], _hashmix(entropy[src], hash_const))
    out32, hash_b = [], 0x8B51F9DD
    for i in range(2 * words):
        value = pool[i % 4] ^ hash_b
        hash_b = (hash_b * 0x58F38DED) & MASK32
        value = (value * hash_b) & MASK32
        out32.append(value ^ (value >> 16))
    return [out32[2 * i] | (out32[2 * i + 1] << 32) for i in range(words)]  # little-endian pairs


class PCG64:
    MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645

    def __init__(self, seed: int):
        s_hi, s_lo, i_hi, i_lo = seed_sequence_uint64(seed)
        self.increment = (((i_hi << 64) | i_lo) << 1 | 1) & MASK128
        self.state = 0
        self._step()
        self.state = (self.state + ((s_hi << 64) | s_lo)) & MASK128
        self._step()
        self.half = None

    def _step(self) -> None:
        self.state = (self.state * self.MULTIPLIER + self.increment) & MASK128

    def next_uint64(self) -> int:
        self._step()
        rotation, value = self.state >> 122, ((self.state >> 64) ^ self.state) & MASK64
        return ((value >> rotation) | (value << (64 - rotation))) & MASK64

    def next_float32(self) -> np.float32:
        if self.half is None:
            word = self.next_uint64()
            low, self.half = word & MASK32, word >> 32
        else:
            low, self.half = self.half, None
        return np.float32((low >> 8) * 2.0**-24)


def test_pcg64_vectors_follow_the_published_algorithms():
    seeds = _json("pcg64.json")["seeds"]
    assert len(seeds) >= 10 and max(int(s["seed"], 16) for s in seeds) == 2**64 - 1
    for entry in seeds:
        seed = int(entry["seed"], 16)
        assert [int(w, 16) for w in entry["seed_sequence_uint64"]] == seed_sequence_uint64(seed), seed
        generator = PCG64(seed)
        assert (int(entry["state"], 16), int(entry["increment"], 16)) == (generator.state, generator.increment)
        assert [int(v, 16) for v in entry["uint64"]] == [generator.next_uint64() for _ in entry["uint64"]]
        stream = _array(entry["float32_stream"])
        generator = PCG64(seed)
        assert np.array_equal(stream, np.float32([generator.next_float32() for _ in stream]))
        assert entry["float32_bits"] == _bits(stream[: len(entry["float32_bits"])])


def test_schedules_are_torch_float32():
    """Temperatures are torch's float32 linspace bit for bit. Mask ratios are the correctly rounded cosine
    of the float32 angle (portable: any libm's double cos gives it); torch's float32 cos (SLEEF, 1 ulp)
    is at most 1 ulp away, and no mask length in the kit differs from the reference scheduler's."""
    schedules = _json("schedules.json")
    for entry in schedules["temperatures"]:
        assert entry["float32_bits"] == _bits(torch.linspace(2.0, 0.0, entry["steps"]).numpy()), entry["steps"]
    assert {e["steps"] for e in schedules["temperatures"]} >= {1, 2, 16, 48, 64}
    for entry in schedules["mask_lengths"]:
        steps, start = entry["steps"], entry["starting_ratio"]
        reference = [mask_ratio(i, steps, start).reshape(()) for i in range(steps - 1)]
        kit = np.array([int(b, 16) for b in entry["ratio_float32_bits"]], dtype=np.uint32).view(np.float32)
        angles = np.float32(np.arange(1, steps, dtype=np.float32) / np.float32(steps) * np.float32(math.pi) / np.float32(2))
        assert np.array_equal(kit, np.float32(start) * np.cos(angles.astype(np.float64)).astype(np.float32))
        ulps = np.abs(kit.view(np.int32).astype(np.int64) - np.float32([r.item() for r in reference]).view(np.int32))
        assert ulps.max(initial=0) <= 1
        assert entry["floor_positions_times_ratio"] == [int((entry["positions"] * r).floor()) for r in reference]


def test_tokenizer_vectors_are_transformers_clip(tmp_path):
    vectors = _json("tokenizer.json")
    prompts = [case["prompt"] for case in vectors["cases"]]
    assert len(prompts) >= 300 and any(len(p) > 300 for p in prompts) and any("🐱" in p for p in prompts)
    folder = tmp_path / "tokenizer"  # the shapes model's tokenizer as make-checkpoint writes it
    shutil.copytree(ASSETS / "shapes" / "tokenizer", folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(ASSETS / "tokenizer" / name, folder / name)
    reference = TransformersCLIPTokenizer.from_pretrained(str(folder))
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert vectors["pad_id"] == reference.pad_token_id
    mismatched = [p for p, case, e in zip(prompts, vectors["cases"], expected) if case["ids"] != e.tolist()]
    assert not mismatched, mismatched[:5]


def test_recorded_generation_replays_step_by_step_from_the_kit_alone():
    """What the README tells a port to do: from each recorded denoise_step output, the Gumbel noise, the
    temperature and the mask length, re-mask and compare with the recorded tokens; feed them to the next step."""
    generation = _json("generation.json")
    calls, mask_id = generation["calls"], None
    steps = generation["steps"]
    assert len(steps) == generation["request"]["steps"]
    log_flt_max = np.log(np.finfo(np.float32).max, dtype=np.float32)
    for index, entry in enumerate(steps):
        call = calls[entry["call"]]
        tokens_in = _array(call["inputs"]["tokens"]).reshape(1, -1)
        if index == 0:
            mask_id = int(tokens_in.max())
            assert (tokens_in == mask_id).all()
        else:  # the tokens fed to this step are the previous step's result
            assert np.array_equal(tokens_in, _array(steps[index - 1]["tokens_after"]).reshape(1, -1))
        unknown = tokens_in == mask_id
        sampled = np.where(unknown, _array(call["outputs"]["sampled_tokens"]).reshape(1, -1), tokens_in)
        if "mask_length" in entry:
            noise = _array(entry["gumbel_noise"])
            uniforms = _array(entry["gumbel_uniforms"])
            tiny = np.float32(1e-20)
            assert np.array_equal(noise, -np.log(np.maximum(-np.log(np.maximum(uniforms, tiny)), tiny)))
            temperature = np.uint32(int(entry["temperature_float32_bits"], 16)).view(np.float32)
            confidence = np.where(unknown, _array(call["outputs"]["log_probs"]).reshape(1, -1), log_flt_max) + temperature * noise
            cut_off = np.sort(confidence, axis=-1)[:, entry["mask_length"]]
            expected = np.where(confidence < cut_off, mask_id, sampled)
        else:
            expected = sampled
        assert np.array_equal(expected, _array(entry["tokens_after"]).reshape(1, -1)), f"step {index}"
    assert np.array_equal(_array(steps[-1]["tokens_after"]), _array(generation["final_tokens"]))
    decoder = [c for c in calls if c["graph"] == "vq_decoder"][-1]
    assert np.array_equal(_array(decoder["inputs"]["tokens"]), _array(generation["final_tokens"]))

"""The port kit: language-neutral test vectors for a Swift, Kotlin or JavaScript port of the runtime.

A port of `runtimes/` has four things to get bit-exact before its images can match: PCG64 (with numpy's
seeding), the float32 schedules, the CLIP tokenizer and the sampler's step. The kit records each one,
from the runtime itself, as JSON plus raw little-endian arrays (the README's "Porting" section says how
to read and use them):

    kit.json            what the kit holds, with its format version
    pcg64.json          seed -> SeedSequence words, PCG64 state, 64-bit outputs, float32 draws (+ raw streams)
    schedules.json      float32 temperatures, mask ratios and mask lengths for several step counts and grids
    tokenizer.json      prompts (unicode, emoji, long) -> 77 ids
    generation.json     one whole generation of a bundle: every graph call's inputs and outputs, and per
                        step the draws, the mask length and the tokens that result (arrays in generation/)

Integers that may exceed 2^53 (seeds, PCG64 words) are hex strings in JSON; float32 values are given as
their bit patterns ("0x3f800000"), so a port compares bits, not printed decimals.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from meissonic.runtimes.pipeline import MeissonicRuntime
from meissonic.runtimes.sampler import LOG_FLOAT32_MAX, Backend, cosine_mask_ratio, gumbel, linspace_float32
from meissonic.runtimes.tokenizer import CLIPTokenizer

KIT_VERSION = 1
KIT_FILE = "kit.json"
SEEDS = [0, 1, 7, 42, 2026, 2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63, 2**64 - 2, 2**64 - 1]
PCG_OUTPUTS = 8  # 64-bit outputs per seed, in JSON
PCG_FLOAT_DRAWS = 16  # float32 draws per seed, in JSON; the raw stream has RAW_DRAWS
RAW_DRAWS = 1024
STEP_COUNTS = [1, 2, 3, 4, 8, 12, 16, 24, 32, 48, 64, 100]
GRID_POSITIONS = [64, 256, 1024, 4096]  # 128, 256, 512 and 1024 px with 16-pixel tokens
STARTING_RATIOS = [1.0, 0.25]  # text-to-image; inpainting a quarter of the grid
GENERATION_PROMPT = "a red circle on a blue background"
GENERATION_SEED = 0

TOKENIZER_EDGE_CASES = [
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


def tokenizer_prompts(count: int = 320) -> list[str]:
    """The edge cases, then prompts stitched from their words and a few more by a fixed seed: mixed
    scripts, emoji, joiners without spaces, and lengths past the 77-token context."""
    rng = random.Random(0)
    words = [w for p in TOKENIZER_EDGE_CASES for w in p.split()] + ["🐶", "ÉCOLE", "x86_64", "3D", "4K", "!", "?!", "re-mask", "Ⅻ"]
    prompts = list(TOKENIZER_EDGE_CASES)
    while len(prompts) < count:
        n = rng.randint(1, 30)
        joiners = [" ", "  ", ", ", "\n", "-", ""]
        prompts.append("".join(rng.choice(words) + rng.choice(joiners) for _ in range(n)))
    return prompts


def _dumps(value, indent: str = "") -> str:
    """JSON with one line per array of scalars and per small object, so a 77-id row or a 16-step
    schedule reads as one line (json.dumps' indent puts every number on its own line)."""
    flat = json.dumps(value, ensure_ascii=False)
    scalars = isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value)
    if not isinstance(value, (list, dict)) or scalars or len(flat) + len(indent) <= 120:
        return flat
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + f"\n{indent}]"


def _hex(value: int) -> str:
    return hex(int(value))


def _float32_bits(values) -> list[str]:
    return [f"0x{int(b):08x}" for b in np.asarray(values, dtype="<f4").view("<u4").ravel()]


class ArrayFiles:
    """Raw little-endian arrays under one folder, described in JSON as {file, dtype, shape}. An array
    identical to one already written (the conditioning, fed to every step) points to that file."""

    def __init__(self, root: Path, folder: str):
        self.root, self.folder, self.written = root, folder, {}
        (root / folder).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, array: np.ndarray) -> dict:
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        key = (array.dtype.str, array.shape, data)
        if key not in self.written:
            relative = f"{self.folder}/{name}.bin"
            (self.root / relative).write_bytes(data)
            self.written[key] = relative
        return {"file": self.written[key], "dtype": array.dtype.name, "shape": list(array.shape)}


def pcg64_vectors(root: Path) -> dict:
    streams = ArrayFiles(root, "pcg64")
    seeds = []
    for seed in SEEDS:
        words = np.random.SeedSequence(seed).generate_state(4, np.uint64)
        state = np.random.PCG64(seed).state["state"]
        outputs = np.random.PCG64(seed).random_raw(PCG_OUTPUTS)
        draws = np.random.Generator(np.random.PCG64(seed)).random(RAW_DRAWS, dtype=np.float32)
        seeds.append({
            "seed": _hex(seed),
            "seed_sequence_uint64": [_hex(w) for w in words],
            "state": _hex(state["state"]), "increment": _hex(state["inc"]),
            "uint64": [_hex(v) for v in outputs],
            "float32_bits": _float32_bits(draws[:PCG_FLOAT_DRAWS]),
            "float32_stream": streams.write(f"seed-{seed}", draws),
        })  # fmt: skip
    return {
        "about": "numpy.random.Generator(PCG64(seed)): SeedSequence(seed).generate_state(4, uint64) = [s_hi, s_lo, "
        "i_hi, i_lo]; PCG64 is seeded with state s and sequence i (state 0, inc = 2i+1, step, add s, step); each "
        "output steps the 128-bit LCG and returns XSL-RR of the new state. A float32 draw is (u32 >> 8) * 2^-24, "
        "u32 taking the low then the high half of each 64-bit output.",
        "seeds": seeds,
    }


def schedule_vectors() -> dict:
    temperatures = [{"steps": n, "float32_bits": _float32_bits(linspace_float32(2.0, 0.0, n))} for n in STEP_COUNTS]
    mask_lengths = []
    for ratio in STARTING_RATIOS:
        for n in STEP_COUNTS:
            ratios = np.float32([cosine_mask_ratio(i + 1, n, ratio) for i in range(n - 1)])
            for positions in GRID_POSITIONS:
                lengths = np.floor(np.float32(positions) * ratios).astype(np.int64)
                mask_lengths.append({"starting_ratio": ratio, "steps": n, "positions": positions, "ratio_float32_bits": _float32_bits(ratios), "floor_positions_times_ratio": lengths.tolist()})
    return {
        "about": "temperatures: linspace(2, 0, steps) in float32 as torch computes it. Mask lengths after step i "
        "(i = 0 .. steps-2): floor(float32(positions) * ratio_i) with ratio_i = starting_ratio * cos(pi/2 * (i+1)/steps) "
        "rounded as the sampler does; the sampler then clamps it to [1, unknown - 1].",
        "temperatures": temperatures,
        "mask_lengths": mask_lengths,
    }


def tokenizer_vectors(tokenizer: CLIPTokenizer) -> dict:
    prompts = tokenizer_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts are truncated on purpose
        ids = tokenizer(prompts)
    return {
        "about": "CLIP BPE as transformers' CLIPTokenizer: 77 ids, <|startoftext|> ... <|endoftext|> then padding; "
        "prompts over 75 tokens truncated. Pad id as the bundle's tokenizer_config.json says.",
        "pad_id": tokenizer.pad_id,
        "cases": [{"prompt": p, "ids": row.tolist()} for p, row in zip(prompts, ids)],
    }


class RecordingBackend(Backend):
    """Another backend's graphs, with every call's inputs and outputs kept in order."""

    def __init__(self, inner: Backend):
        super().__init__()
        self.inner, self.name, self.calls = inner, inner.name, []

    def _load(self, name: str):
        graph = self.inner.graph(name)

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = graph(inputs)
            self.calls.append((name, dict(inputs), outputs))
            return outputs

        return run


def generation_vectors(bundle: Path, root: Path) -> dict:
    """One text-to-image generation of the bundle's base ONNX variant at the model's own settings."""
    runtime = MeissonicRuntime.from_bundle(bundle)
    recorder = RecordingBackend(runtime.backend)
    runtime.sampler.backend = recorder
    after_step = []
    result = runtime.generate(GENERATION_PROMPT, seed=GENERATION_SEED, progress=False, on_step=lambda report: after_step.append(report.tokens))

    defaults = runtime.manifest.model.defaults
    steps, (width, height), mask_id = defaults.steps, runtime.default_size, runtime.manifest.model.mask_token_id
    arrays = ArrayFiles(root, "generation")
    calls = []
    for index, (graph, inputs, outputs) in enumerate(recorder.calls):
        calls.append({
            "graph": graph,
            "inputs": {k: arrays.write(f"{index:02d}-{graph}-in-{k}", v) for k, v in inputs.items()},
            "outputs": {k: arrays.write(f"{index:02d}-{graph}-out-{k}", v) for k, v in outputs.items()},
        })  # fmt: skip

    # The sampler's draws, replayed from the same stream: per step the categorical draw (the step graph's
    # `uniforms`), then, on all steps but the last, the Gumbel draw of the re-masking.
    rng = np.random.Generator(np.random.PCG64(GENERATION_SEED))
    step_calls = [i for i, (graph, _, _) in enumerate(recorder.calls) if graph == "denoise_step"]
    temperatures = linspace_float32(*defaults.temperature, steps)
    per_step = []
    for step, call in enumerate(step_calls):
        uniforms = recorder.calls[call][1]["uniforms"]
        if not np.array_equal(rng.random(uniforms.shape, dtype=np.float32), uniforms):
            raise AssertionError("the replayed random stream differs from the sampler's")  # a bug here, not a user error
        entry = {"step": step, "call": call, "temperature_float32_bits": _float32_bits([temperatures[step]])[0]}
        if step < steps - 1:
            draw = rng.random(uniforms.shape, dtype=np.float32)
            entry["gumbel_uniforms"] = arrays.write(f"step{step:02d}-gumbel-uniforms", draw)
            entry["gumbel_noise"] = arrays.write(f"step{step:02d}-gumbel-noise", gumbel(draw))
            positions, unknown = uniforms.shape[-1], int((recorder.calls[call][1]["tokens"] == mask_id).sum())
            entry["mask_length"] = int(max(1, min(unknown - 1, np.floor(np.float32(positions) * cosine_mask_ratio(step + 1, steps)))))
        entry["tokens_after"] = arrays.write(f"step{step:02d}-tokens-after", after_step[step])
        per_step.append(entry)
    image_path = root / "generation" / "image.png"
    result.images[0].save(image_path, format="PNG")
    return {
        "about": "The sampler's graph calls in order (text_encoder for the prompt, then for the negative prompt; "
        "denoise_step per step; vq_decoder), each input and output as a raw little-endian array. Per step: the "
        "draws, the temperature, the mask length and the tokens after re-masking (mask id where unknown). "
        f"Confidence of a given token: log(FLT_MAX) = {float(LOG_FLOAT32_MAX)!r}.",
        "bundle": {"weights_sha256": runtime.manifest.source["weights_sha256"], "variant": runtime.backend.variant},
        "request": {"prompt": GENERATION_PROMPT, "negative_prompt": "", "seed": GENERATION_SEED, "width": width, "height": height,
                    "steps": steps, "guidance_scale": defaults.guidance_scale, "temperature": list(defaults.temperature)},
        "calls": calls,
        "steps": per_step,
        "final_tokens": arrays.write("final-tokens", result.tokens),
        "image": "generation/image.png",
    }  # fmt: skip


def write_port_kit(bundle: Path, root: Path, progress: bool = True) -> list[Path]:
    """Fill the empty folder `root` with the kit; returns the JSON files written."""
    parts = [
        ("pcg64.json", lambda: pcg64_vectors(root)),
        ("schedules.json", schedule_vectors),
        ("tokenizer.json", lambda: tokenizer_vectors(CLIPTokenizer(Path(bundle) / "tokenizer"))),
        ("generation.json", lambda: generation_vectors(bundle, root)),
    ]
    written = []
    for name, make in tqdm(parts, desc="port kit", disable=not progress):
        (root / name).write_text(_dumps(make()) + "\n")
        written.append(root / name)
    (root / KIT_FILE).write_text(_dumps({"tool": "meissonic-export port-kit", "format_version": KIT_VERSION, "files": [p.name for p in written]}) + "\n")
    return [root / KIT_FILE, *written]


def is_port_kit_written_here(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / KIT_FILE).read_text()).get("tool") == "meissonic-export port-kit"
    except (OSError, ValueError, AttributeError):
        return False

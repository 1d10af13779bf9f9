"""The torch-free runtime against the reference pipeline, its arithmetic against torch's, and bad input.

Equality standard: the runtime (numpy loop + exported graphs, PCG64 seed) and the reference pipeline in
explicit-noise mode (`UniformNoise.from_seed`, same seed) give identical tokens; images are compared as
the PNG bytes a user gets, within 1/255 (float32 decoders differ by ~1e-6 before rounding).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic.reference.scheduler import UniformNoise, mask_ratio
from meissonic.runtimes.pipeline import MeissonicRuntime
from meissonic.runtimes.sampler import cosine_mask_ratio, linspace_float32

SIZE = (192, 128)  # non-square, one of the tiny bundle's resolutions


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return MeissonicRuntime.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth test picture (gradients and a disc), saved as PNG."""
    y, x = np.mgrid[0 : SIZE[1], 0 : SIZE[0]] / np.array(SIZE[::-1])[:, None, None]
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(float)
    pixels = np.stack([x, y, disc], -1) * 255
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _compare(runtime, reference, **kwargs):
    seed = kwargs.pop("seed")
    ours = runtime.generate(width=SIZE[0], height=SIZE[1], seed=seed, progress=False, **kwargs)
    theirs = reference(
        kwargs["prompt"], negative_prompt=kwargs.get("negative_prompt"), width=SIZE[0], height=SIZE[1],
        num_inference_steps=kwargs.get("steps", 48), guidance_scale=kwargs.get("guidance_scale", 9.0),
        num_images_per_prompt=kwargs.get("num_images", 1), image=kwargs.get("image"), strength=kwargs.get("strength", 1.0),
        mask=kwargs.get("mask"), noise=UniformNoise.from_seed(seed), progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(ours.tokens, theirs.tokens.numpy())
    difference = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(ours.images, theirs.images))
    assert difference <= 1
    return ours


def test_text_to_image_identical_to_reference(runtime, golden_pipeline):
    result = _compare(runtime, golden_pipeline, prompt=["a photo of a cat", "a red bicycle"], negative_prompt="blurry", steps=10, num_images=2, seed=11)
    assert result.tokens.shape == (4, 8, 12) and result.pixels.shape == (4, 3, 128, 192)
    assert len({r.tobytes() for r in result.tokens}) == 4  # every image differs


def test_without_guidance_identical_to_reference(runtime, golden_pipeline):
    _compare(runtime, golden_pipeline, prompt="a house", guidance_scale=1.0, steps=6, seed=2)


def test_image_to_image_identical_to_reference(runtime, golden_pipeline, photo):
    _compare(runtime, golden_pipeline, prompt="a painting", image=photo, strength=0.6, steps=10, seed=3)


def test_inpainting_identical_to_reference(runtime, golden_pipeline, photo, tmp_path):
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (48, 32, 144, 96))
    mask.save(tmp_path / "mask.png")
    _compare(runtime, golden_pipeline, prompt="a hat", image=photo, mask=tmp_path / "mask.png", steps=8, seed=4)


def test_low_memory_releases_each_graph_after_its_phase(tiny_bundle, runtime, photo):
    """Same tokens, and no graph left loaded: each is dropped when its phase ends. Outputs own their
    memory (onnxruntime's are views that would keep a released session's buffers alive)."""
    lean = MeissonicRuntime.from_bundle(tiny_bundle, low_memory=True)
    for kwargs in ({}, {"image": photo, "strength": 0.5}):
        ours = lean.generate("a cat", steps=3, width=SIZE[0], height=SIZE[1], seed=5, progress=False, **kwargs)
        theirs = runtime.generate("a cat", steps=3, width=SIZE[0], height=SIZE[1], seed=5, progress=False, **kwargs)
        np.testing.assert_array_equal(ours.tokens, theirs.tokens)
        assert lean.backend._graphs == {}
    outputs = runtime.backend.graph("text_encoder")({"input_ids": np.zeros((1, 77), np.int64)})
    assert all(value.base is None for value in outputs.values())


def test_mask_schedule_arithmetic_matches_torch():
    """The float32 mask lengths and temperatures equal the reference's for every step of many runs."""
    for steps in range(1, 101):
        for start, end in ((2.0, 0.0), (1.5, 0.25), (0.7, 2.3)):
            np.testing.assert_array_equal(linspace_float32(start, end, steps), torch.linspace(start, end, steps).numpy())
        for positions in (16, 96, 256, 1024, 4096, 16384):
            for start_ratio in (1.0, 0.5, 0.3671875):
                ratio32 = np.float32(start_ratio)
                ours = [np.floor(np.float32(positions) * cosine_mask_ratio(i + 1, steps, ratio32)) for i in range(steps)]
                theirs = [(positions * mask_ratio(i, steps, torch.tensor(start_ratio))).floor().item() for i in range(steps)]
                assert ours == theirs, (steps, positions, start_ratio)


def test_runtime_needs_no_torch(tiny_bundle, tmp_path):
    """Import and run the runtime where `import torch` (and transformers) fail."""
    blocker = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "transformers", "coremltools"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        """
    )
    (tmp_path / "sitecustomize.py").write_text(blocker)
    out = tmp_path / "cat.png"
    code = (
        "import sys; from meissonic.runtimes.cli import main; "
        f"code = main([{str(tiny_bundle)!r}, 'a cat', '--steps', '4', '--size', '192x128', '--out', {str(out)!r}, '--no-progress']); "
        "assert 'torch' not in sys.modules; sys.exit(code)"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{__import__('os').getcwd()}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == SIZE
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, check=False, env=env)
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker really was active
    # the runtime installed without its `coreml` extra: --backend coreml says what to install, in one line
    coreml = subprocess.run([sys.executable, "-m", "meissonic.runtimes.cli", str(tiny_bundle), "a cat", "--backend", "coreml", "--out", str(out)],
                            capture_output=True, text=True, check=False, env=env)  # fmt: skip
    assert coreml.returncode == 2 and coreml.stderr.strip().splitlines() == [
        "meissonic-generate: error: --backend coreml needs coremltools, which is not installed: pip install 'meissonic-export[coreml]'"
    ], coreml.stderr


# ---- bad input: one line naming the problem ----------------------------------------------------


def _generate(*args):
    run = subprocess.run([sys.executable, "-m", "meissonic.runtimes.cli", *map(str, args), "--no-progress"], capture_output=True, text=True, check=False)
    return run.returncode, run.stderr.strip().splitlines()


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _error(args, expected):
    code, lines = _generate(*args)
    errors = [line for line in lines if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1] and expected in errors[0], lines


def test_unknown_format_version(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    _error([bundle_copy, "a cat"], "bundle format version 99 is not supported")


def test_model_section_lacking_a_fact(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    del raw["model"]["mask_token_id"]
    manifest.write_text(json.dumps(raw))
    _error([bundle_copy, "a cat"], "bad manifest: model section: missing ['mask_token_id']")


def test_missing_and_corrupt_files(bundle_copy):
    (bundle_copy / "onnx/fp32/vq_decoder/model.onnx").unlink()
    _error([bundle_copy, "a cat", "--steps", "1", "--size", "192x128"], "vq_decoder/model.onnx: missing from the bundle")
    vocab = bundle_copy / "tokenizer/vocab.json"
    vocab.write_text(vocab.read_text().replace('"a</w>"', '"b</w>"', 1))
    _error([bundle_copy, "a cat"], "tokenizer/vocab.json: corrupt")


def test_not_a_bundle(tmp_path):
    _error([tmp_path / "nothing", "a cat"], "bundle folder not found")
    (tmp_path / "half").mkdir()
    _error([tmp_path / "half", "a cat"], "manifest.json: missing; not a complete bundle")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--size", "768"], "size 768x768 is not supported by this bundle (exported and validated for 512x512, 192x128)"),
        (["--steps", "0"], "--steps: must be in [1, 1000] (got 0)"),
        (["--guidance", "-1"], "--guidance: must be in [0, 100] (got -1)"),
        (["--variant", "int3"], "variant 'int3' is not in this bundle's onnx graphs"),
        (["--size", "big"], "--size: cannot read 'big'"),
    ],
)
def test_bad_request(tiny_bundle, arguments, expected):
    _error([tiny_bundle, "a cat", *arguments], expected)


def test_bad_images(tiny_bundle, photo, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    _error([tiny_bundle, "a cat", "--size", "192x128", "--image", tmp_path / "broken.png"], "broken.png: unreadable image")
    _error([tiny_bundle, "a cat", "--size", "192x128", "--image", tmp_path / "absent.png"], "absent.png not found")
    Image.new("L", (64, 64), 255).save(tmp_path / "small-mask.png")
    _error([tiny_bundle, "a cat", "--size", "192x128", "--image", photo, "--mask", tmp_path / "small-mask.png"], "mask is 64x64 but the image is 192x128")


def test_cli_writes_numbered_pngs_for_a_prompts_file(tiny_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    code, lines = _generate(tiny_bundle, "--prompts-file", prompts, "--steps", "2", "--size", "192x128", "--out", tmp_path / "img.png")
    assert code == 0, lines
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == ["img-0.png", "img-1.png"]


def test_each_step_is_reported_with_a_preview_and_can_be_cancelled(runtime):
    from meissonic.runtimes.sampler import GenerationCancelled

    request = {"prompt": "a cat", "steps": 4, "width": SIZE[0], "height": SIZE[1], "seed": 3, "progress": False}
    reports = []
    result = runtime.generate(**request, on_step=lambda r: reports.append((r.step, r.tokens.copy(), r.preview())))
    mask_id = runtime.manifest.model.mask_token_id
    assert [step for step, _, _ in reports] == [0, 1, 2, 3]
    still_masked = [int((tokens == mask_id).sum()) for _, tokens, _ in reports]
    assert still_masked == sorted(still_masked, reverse=True) and still_masked[0] > 0 and still_masked[-1] == 0, still_masked
    assert reports[0][2].shape == result.pixels.shape and np.isfinite(reports[0][2]).all()
    np.testing.assert_array_equal(reports[-1][1], result.tokens)
    np.testing.assert_array_equal(reports[-1][2], result.pixels)  # the last preview is the final image
    np.testing.assert_array_equal(runtime.generate(**request).tokens, result.tokens)  # reporting draws nothing

    seen = []
    with pytest.raises(GenerationCancelled, match="after step 2 of 4"):
        runtime.generate(**request, on_step=lambda r: seen.append(r.step) or r.step < 1)
    assert seen == [0, 1]


def test_cli_writes_the_steps_as_an_animated_png(tiny_bundle, tmp_path):
    out = tmp_path / "cat.png"
    code, lines = _generate(tiny_bundle, "a cat", "--steps", "4", "--size", "192x128", "--preview-every", "2", "--out", out)
    assert code == 0, lines
    steps = Image.open(tmp_path / "cat.steps.png")
    assert steps.n_frames == 2  # after steps 2 and 4
    steps.seek(1)
    assert np.array_equal(np.asarray(steps.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    code, lines = _generate(tiny_bundle, "a cat", "--steps", "4", "--size", "192x128", "--preview-every", "4", "--out", out)
    assert code == 0 and any("--preview-every 4 is not below the number of steps run" in line for line in lines), lines
    _error([tiny_bundle, "a cat", "--preview-every", "-1"], "--preview-every: must be in [0, 1000] (got -1)")

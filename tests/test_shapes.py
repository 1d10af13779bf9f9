"""The shapes demo model: its world, its analyzer, its training, and what the shipped checkpoint draws
through the reference and the torch-free runtime.

The default run uses the shipped checkpoint (it trains nothing but a few steps of the determinism
check) and a small evaluation subset; `pytest -m slow tests/test_shapes.py` runs the full evaluation
of every ONNX and Core ML variant.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic.reference import shapes
from meissonic.reference.folder import OWNER_MARKER, TOKENIZER_ASSETS, TRAINED
from meissonic.reference.presets import PRESETS, write_checkpoint
from meissonic.reference.training import SHAPES_GENERATION, TrainConfig, train_shapes

SHIPPED = TRAINED["shapes"]


def test_the_world_is_as_specified():
    assert len(shapes.ALL_SCENES) == 8 * 7 * 3
    assert len(shapes.HELD_OUT) >= 20 and not set(shapes.HELD_OUT) & set(shapes.TRAINING_SCENES)
    scenes, images = shapes.dataset(64, seed=5)
    assert images.shape == (64, 256, 256, 3) and images.dtype == np.uint8
    for scene, image in zip(scenes, images, strict=True):
        colors = {tuple(c) for c in image.reshape(-1, 3)}
        assert colors <= {shapes.COLORS[scene.color], shapes.COLORS[scene.background]}  # exact sRGB, no anti-aliasing
        assert scene.color != scene.background
        rows, cols = np.nonzero((image != shapes.COLORS[scene.background]).any(-1))
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 0.35 * 256 - 1 <= side <= 0.70 * 256 + 1
    again = shapes.dataset(64, seed=5)[1]
    assert np.array_equal(images, again)  # deterministic from the seed


def test_analyzer_reads_the_data_set_back():
    """The issue's bound: right on at least 99.5% of the data set's own images (all 168 combinations)."""
    scenes, images = shapes.dataset(600, seed=11, scenes=shapes.ALL_SCENES)
    right = sum(shapes.analyze(image).scene() == scene for scene, image in zip(scenes, images, strict=True))
    assert right / len(scenes) >= 0.995, right


def test_analyzer_says_so_when_there_is_no_shape():
    reading = shapes.analyze(np.full((256, 256, 3), shapes.COLORS["blue"], np.uint8))
    assert reading.background == "blue" and reading.scene() is None


def test_evaluation_set_is_fixed_and_reports_held_out_apart():
    pairs = shapes.evaluation_set()
    assert pairs == shapes.evaluation_set()
    assert sum(not p.held_out for p in pairs) == 200 and sum(p.held_out for p in pairs) == 2 * len(shapes.HELD_OUT)
    assert all((p.scene in shapes.HELD_OUT) == p.held_out for p in pairs)


def test_accuracy_gate_judges_each_variant_against_its_own_targets_base():
    """A Core ML report carries the ONNX float32 row as its reference: only Core ML rows are judged."""
    from meissonic_export.evaluate import accuracy_gate

    rows = {"pytorch": 0.30, "onnx fp32": 0.30, "coreml fp16": 0.40, "coreml int8": 0.35, "coreml palette6": 0.38}
    refused = accuracy_gate({"rows": {name: {"prompt_accuracy": a} for name, a in rows.items()}}, "coreml fp16")
    assert list(refused) == ["coreml int8"] and "5.0 points below coreml fp16's 40.0%" in refused["coreml int8"]


def test_training_is_deterministic_from_the_seed(tmp_path):
    config = TrainConfig(vq_steps=3, vq_crop=64, images=16, steps=3, batch=4, code_restart_every=2)
    for name in ("a", "b"):
        train_shapes(tmp_path / name, config, progress=False)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    report = json.loads((tmp_path / "a" / "training" / "report.json").read_text())
    assert report["config"]["steps"] == 3 and (tmp_path / "a" / "training" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_directional_heads_start_looking_at_their_neighbour():
    """The recipe's initialization: on the q and k biases alone (what the heads see before any input
    moves them), each dual-stream block's head j scores the neighbour NEIGHBOUR_DIRECTIONS[j] of a
    cell highest among the 8x8 grid's cells, and a default-initialized head does not."""
    from meissonic.reference.training import NEIGHBOUR_DIRECTIONS, init_directional_heads
    from meissonic.reference.transformer import TEXT_POSITIONS, MeissonicTransformer, apply_rotary

    def best_neighbour(transformer):
        side, centre = 8, (4, 4)
        cos, sin = (t[TEXT_POSITIONS:] for t in transformer.rotary(side, side))  # [64, head_dim], row-major cells
        found = []
        for block in transformer.transformer_blocks:
            attention = block.attn
            q = apply_rotary(attention.norm_q(attention.to_q.bias.view(attention.heads, -1))[:, None, :], cos, sin)
            k = apply_rotary(attention.norm_k(attention.to_k.bias.view(attention.heads, -1))[:, None, :], cos, sin)
            scores = (q[:, centre[0] * side + centre[1]][:, None, :] * k).sum(-1)  # [heads, 64]
            found.append([(int(i) // side - centre[0], int(i) % side - centre[1]) for i in scores.argmax(-1)])
        return found

    torch.manual_seed(0)
    default = MeissonicTransformer(PRESETS["shapes"].transformer)
    torch.manual_seed(0)
    directional = MeissonicTransformer(PRESETS["shapes"].transformer)
    init_directional_heads(directional)  # runs under no_grad itself
    assert best_neighbour(directional) == [list(NEIGHBOUR_DIRECTIONS)] * len(directional.transformer_blocks)
    assert best_neighbour(default) != best_neighbour(directional)


def test_shipped_checkpoint_loads_strictly_and_make_checkpoint_writes_it(tmp_path):
    from meissonic.reference.pipeline import MeissonicPipeline

    out = write_checkpoint("shapes", tmp_path / "shapes")
    assert (out / OWNER_MARKER).is_file()
    for path in SHIPPED.rglob("*"):
        if path.is_file() and path.name != "__init__.py":
            assert (out / path.relative_to(SHIPPED)).read_bytes() == path.read_bytes()
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).read_bytes() == (TOKENIZER_ASSETS / name).read_bytes()
    pipe = MeissonicPipeline.from_pretrained(out)
    assert pipe.transformer.config == PRESETS["shapes"].transformer
    assert json.loads((out / "generation_config.json").read_text()) == SHAPES_GENERATION


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory):
    """The shipped model as `make-checkpoint` writes it (the shipped folder shares CLIP's BPE files)."""
    return write_checkpoint("shapes", tmp_path_factory.mktemp("shapes") / "checkpoint")


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory, shapes_checkpoint):
    from meissonic_export.export import export_bundle
    from meissonic_export.options import ExportOptions

    out = tmp_path_factory.mktemp("shapes") / "bundle"
    export_bundle(shapes_checkpoint, out, ExportOptions(jobs=1, progress=False))
    return out


def test_a_partial_export_of_the_trained_model_says_why_it_was_not_judged_by_what_it_draws(shapes_checkpoint, tmp_path):
    """The text encoder alone, quantized: its own gates run, and the whole-run and prompt-accuracy reports,
    which need a generation, say what they lacked (the accuracy gate used to end in a traceback)."""
    from meissonic.runtimes.sampler import TEXT_TO_IMAGE_GRAPHS
    from meissonic_export.export import export_bundle
    from meissonic_export.options import ExportOptions

    manifest = export_bundle(shapes_checkpoint, tmp_path / "b", ExportOptions(graphs=("text_encoder",), quantize=("int8",), jobs=1, progress=False))
    assert {(g["name"], g["variant"]) for g in manifest["graphs"]} == {("text_encoder", "fp32"), ("text_encoder", "int8")}
    skipped = {"skipped": f"needs the graphs {list(TEXT_TO_IMAGE_GRAPHS)}"}
    assert manifest["quality"]["onnx"] == skipped and manifest["evaluation"]["onnx"] == skipped


def test_bench_refuses_grids_a_given_bundle_was_not_exported_for(shapes_checkpoint, shapes_bundle, tmp_path, capsys):
    """The shapes bundle is exported for 256 px only, so its step takes the 16x16 grid alone: the benchmark
    says so in one line before timing anything (it ended in onnxruntime's traceback at the first other grid)."""
    from meissonic_export.cli import main

    argv = ["bench", "--checkpoint", str(shapes_checkpoint), "--bundle", str(shapes_bundle), "--no-1b", "--no-progress", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    assert "--bundle: its denoise_step is exported for a 16x16 token grid only" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bundle_carries_the_model_card_settings(shapes_bundle):
    from meissonic.runtimes.pipeline import MeissonicRuntime

    runtime = MeissonicRuntime.from_bundle(shapes_bundle)
    defaults = runtime.manifest.model.defaults.to_json()
    assert {k: defaults[k] for k in ("steps", "guidance_scale", "temperature", "resolution")} == {
        k: SHAPES_GENERATION[k] for k in ("steps", "guidance_scale", "temperature", "resolution")
    }
    assert runtime.default_size == tuple(SHAPES_GENERATION["resolution"])


@pytest.mark.parametrize("pipeline", ["runtime", "reference"])
def test_words_the_model_never_learned_are_named_in_a_warning(pipeline, shapes_bundle, shapes_checkpoint):
    """The shapes model knows its grammar's words only (the others' embeddings are zero): a prompt with
    another word still draws, and the runtime and the reference name the word rather than draw in silence."""
    import warnings

    if pipeline == "runtime":
        from meissonic.runtimes.pipeline import MeissonicRuntime

        encode = MeissonicRuntime.from_bundle(shapes_bundle).sampler.encode_prompts
    else:
        from meissonic.reference.pipeline import MeissonicPipeline

        encode = MeissonicPipeline.from_pretrained(shapes_checkpoint).encode_prompt
    with pytest.warns(UserWarning, match=r"never trained on .* \(their text embeddings are zero\)") as caught:
        encode(["a pink dog on a blue background"])
    assert len(caught) == 1 and {"'dog'", "'pink'"} <= set(str(caught[0].message).replace(",", " ").split())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(["a red circle on a blue background", ""])


def test_a_bundle_for_one_resolution_fixes_the_grid_and_keeps_the_batch(shapes_bundle, shapes_checkpoint):
    """Exported for its 256 px alone, the ONNX graphs fix the 16 x 16 token grid (torch.export traces them
    in about 2/3 of the time) and keep the batch dynamic: three token grids, a batch no validation input
    had, decode as the reference decodes them (float32 image bound of test_onnx_export)."""
    import onnx

    from meissonic.reference.checkpoint import COMPONENTS, load_component
    from meissonic.runtimes.onnx_backend import OnnxGraph
    from meissonic_export.graphs import GRAPHS, model_facts
    from meissonic_export.validate import reference_outputs

    dims = lambda path, index: [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[index].type.tensor_type.shape.dim]
    step, decoder = (shapes_bundle / "onnx" / "fp32" / name / "model.onnx" for name in ("denoise_step", "vq_decoder"))
    assert dims(step, 0) == ["batch", 16, 16] and dims(step, 1) == ["2*batch", 77, 64]
    components = {name: load_component(shapes_checkpoint, name) for name in COMPONENTS}
    spec = GRAPHS["vq_decoder"]
    inputs = spec.sample(model_facts(components), {"batch": 3, "height": 16, "width": 16}, np.random.default_rng(11))
    expected = reference_outputs(spec, spec.build(components), inputs)["image"]
    np.testing.assert_allclose(OnnxGraph(decoder)(inputs)["image"], expected, atol=1e-4, rtol=0)


def test_reference_command_draws_with_the_checkpoints_own_settings(shapes_checkpoint, tmp_path, monkeypatch):
    """`meissonic-export reference` takes what is not given from the checkpoint's generation_config.json,
    as meissonic-generate takes it from the bundle (at the official 1024 px and 48 steps it draws scattered spots);
    flags still win. The pipeline call is recorded, not run: what is checked is what it is asked for."""
    from meissonic.reference.pipeline import MeissonicPipeline, PipelineOutput
    from meissonic_export.cli import main

    calls = []

    def record(self, prompt, **kwargs):
        calls.append(kwargs)
        height, width = kwargs["height"], kwargs["width"]
        return PipelineOutput(torch.zeros(1, height // 16, width // 16, dtype=torch.long), np.zeros((1, 3, height, width), np.float32))

    monkeypatch.setattr(MeissonicPipeline, "__call__", record)
    prompt, own_png = "a red circle on a blue background", tmp_path / "own.png"
    assert main(["reference", str(shapes_checkpoint), prompt, "--out", str(own_png), "--no-progress"]) == 0
    flags = ["--size", "512", "--steps", "3", "--guidance", "1.5", "--temperature", "1", "0"]
    assert main(["reference", str(shapes_checkpoint), prompt, *flags, "--out", str(tmp_path / "flags.png"), "--no-progress"]) == 0
    own, given = calls
    assert ((own["width"], own["height"]), own["num_inference_steps"], own["guidance_scale"], tuple(own["temperature"])) == (
        tuple(SHAPES_GENERATION["resolution"]), SHAPES_GENERATION["steps"], SHAPES_GENERATION["guidance_scale"], tuple(SHAPES_GENERATION["temperature"])
    )
    assert ((given["width"], given["height"]), given["num_inference_steps"], given["guidance_scale"], given["temperature"]) == ((512, 512), 3, 1.5, (1.0, 0.0))
    assert Image.open(own_png).size == tuple(SHAPES_GENERATION["resolution"])


def test_a_small_evaluation_subset_draws_the_prompts(shapes_bundle, tmp_path):
    """24 in-grammar and 8 held-out pairs through the reference and ONNX float32: the reference and the
    runtime agree token for token, and the float32 bound of the full evaluation holds here too."""
    from meissonic_export.evaluate import evaluate_bundle, write_report
    from meissonic_export.options import EvaluateOptions

    report = evaluate_bundle(shapes_bundle, EvaluateOptions(count=24, held_out_seeds=1, progress=False))
    onnx, reference = report["rows"]["onnx fp32"], report["rows"]["pytorch"]
    assert onnx["background_accuracy"] >= MIN_COLOR_ACCURACY and onnx["color_accuracy"] >= MIN_COLOR_ACCURACY, onnx
    assert reference["token_agreement"] >= 0.999 and reference["prompt_accuracy"] == onnx["prompt_accuracy"], reference
    seen = [pair.scene.shape for pair in shapes.evaluation_set(24, 1) if not pair.held_out]
    by_kind = onnx["shape_accuracy_by_kind"]  # the kinds' figures add up to the shape figure, weighted by their pairs
    assert sum(seen.count(kind) * by_kind[kind] for kind in shapes.SHAPES) == pytest.approx(len(seen) * onnx["shape_accuracy"]), by_kind
    paths = write_report(report, tmp_path)
    assert Image.open(paths[2]).size[0] > 256


# What the shipped model does reliably (measured on the evaluation set's 200 pairs at its settings:
# background 100%, color 100%, shape 55.5%, all three 55.5%): colors. Its shapes are mostly blobs; the
# issue's 95% prompt accuracy is not reached.
MIN_COLOR_ACCURACY = 0.90


def _runtime_and_pipeline(shapes_bundle, shapes_checkpoint):
    from meissonic.reference.pipeline import MeissonicPipeline
    from meissonic.runtimes.pipeline import MeissonicRuntime

    return MeissonicRuntime.from_bundle(shapes_bundle), MeissonicPipeline.from_pretrained(shapes_checkpoint)


def test_reference_and_runtime_give_identical_tokens_on_the_trained_model(shapes_bundle, shapes_checkpoint, tmp_path):
    from meissonic.reference.scheduler import UniformNoise

    runtime, pipe = _runtime_and_pipeline(shapes_bundle, shapes_checkpoint)
    d = SHAPES_GENERATION
    common = {"guidance_scale": d["guidance_scale"], "temperature": tuple(d["temperature"])}
    source = runtime.generate("a red circle on a blue background", seed=1, progress=False).images[0]
    source.save(tmp_path / "source.png")
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    mask.save(tmp_path / "mask.png")
    for extra in ({}, {"image": tmp_path / "source.png", "strength": 0.5}, {"image": tmp_path / "source.png", "mask": tmp_path / "mask.png"}):
        for seed in (3, 4):
            ours = runtime.generate("a green square on a white background", seed=seed, steps=d["steps"], progress=False, **common, **extra)
            with torch.no_grad():
                theirs = pipe("a green square on a white background", width=256, height=256, num_inference_steps=d["steps"],
                              noise=UniformNoise.from_seed(seed), progress=False, **common, **extra)  # fmt: skip
            assert np.array_equal(ours.tokens, theirs.tokens.numpy()), (extra.keys(), seed)


def test_committed_port_kit_is_what_the_command_writes(shapes_bundle, tmp_path):
    """`meissonic-export port-kit` on the shipped model rewrites docs/port_kit: same files, the same JSON,
    integer arrays bit for bit; float arrays within 1e-4 of their scale (another CPU's onnxruntime kernels
    may round differently; float32 parity is stated at that level), the PNG within one level."""
    from pathlib import Path

    from meissonic_export.cli import main

    committed, fresh = Path(__file__).parent.parent / "docs" / "port_kit", tmp_path / "kit"
    assert main(["port-kit", str(shapes_bundle), "--out", str(fresh), "--no-progress"]) == 0
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files(fresh) == files(committed)
    generation = json.loads((committed / "generation.json").read_text())
    arrays = {ref["file"]: ref["dtype"] for call in generation["calls"] for ref in [*call["inputs"].values(), *call["outputs"].values()]}
    arrays.update({ref["file"]: ref["dtype"] for step in generation["steps"] for ref in step.values() if isinstance(ref, dict)})
    for name in files(committed):
        old, new = (committed / name).read_bytes(), (fresh / name).read_bytes()
        if name.endswith(".png"):
            a, b = (np.asarray(Image.open(root / name), dtype=np.int16) for root in (committed, fresh))
            assert np.abs(a - b).max() <= 1, name
        elif arrays.get(name, "").startswith("float"):
            a, b = np.frombuffer(old, "<f4"), np.frombuffer(new, "<f4")
            assert np.allclose(a, b, rtol=0, atol=1e-4 * max(1.0, float(np.abs(a).max()))), name
        else:
            assert old == new, name


def test_inpainting_repaints_the_shape_in_the_named_color(shapes_bundle, tmp_path):
    """Mask the tokens under the shape, ask for another shape color: the analyzer reads the new color,
    and every token outside the mask is unchanged."""
    from meissonic.runtimes.pipeline import MeissonicRuntime

    runtime = MeissonicRuntime.from_bundle(shapes_bundle)
    repainted = trials = 0
    for seed, (color, new_color, shape, background) in enumerate(INPAINT_CASES):
        source = runtime.generate(f"a {color} {shape} on a {background} background", seed=seed, progress=False)
        image = source.images[0]
        reading = shapes.analyze(image)
        if (reading.color, reading.background) != (color, background):
            continue  # only repaint what was drawn in the right colors
        pixels = np.asarray(image)
        labels = shapes._nearest_color(pixels) == list(shapes.COLORS).index(color)
        grid = labels.reshape(16, 16, 16, 16).any(axis=(1, 3))  # token cells touching the shape
        mask = Image.fromarray(np.kron(grid, np.ones((16, 16), bool)).astype(np.uint8) * 255)
        image.save(tmp_path / "src.png")
        mask.save(tmp_path / "mask.png")
        out = runtime.generate(f"a {new_color} {shape} on a {background} background", image=tmp_path / "src.png", mask=tmp_path / "mask.png", seed=seed, progress=False)
        encoded = runtime.sampler.backend.graph("vq_encoder")({"image": (pixels.astype(np.float32) / 255).transpose(2, 0, 1)[None]})["tokens"][0]
        assert np.array_equal(out.tokens[0][~grid], encoded[~grid])  # outside the mask: untouched
        trials += 1
        repainted += shapes.analyze(out.images[0]).color == new_color
    assert trials >= 6 and repainted / trials >= MIN_REPAINT_RATE, (repainted, trials)


INPAINT_CASES = [
    ("red", "blue", "circle", "white"), ("green", "yellow", "square", "black"), ("blue", "red", "triangle", "yellow"),
    ("yellow", "purple", "circle", "blue"), ("orange", "green", "square", "purple"), ("white", "orange", "circle", "red"),
    ("black", "white", "triangle", "green"), ("purple", "black", "square", "white"),
]  # fmt: skip
MIN_REPAINT_RATE = 0.75


# How an export refuses a variant, with its reason: the log-prob gate of graph validation, or the prompt-accuracy gate.
REFUSALS = ("failed validation against the reference", "refused by the prompt-accuracy gate")


@pytest.mark.slow
def test_full_evaluation_of_every_variant(tmp_path):
    """The issue's acceptance: ONNX float32 >= 95% prompt accuracy on the 200 pairs at the model card's
    settings; every quantized ONNX and Core ML variant within 3 points of float32, or refused by the
    export with its reason. One export per variant: in one bundle, the first refusal would stop the
    export before the other variants are judged. Core ML runs through the numpy evaluator off macOS
    (about 2.7 s an image: the fp16 base and the int8 gate take about half an hour together).
    Writes the float32 report under tmp_path (the README's table comes from such a run)."""
    from meissonic_export.evaluate import MAX_ACCURACY_LOSS_POINTS, evaluate_bundle, format_table, write_report
    from meissonic_export.export import ExportError, export_bundle
    from meissonic_export.options import EvaluateOptions, ExportOptions

    checkpoint = write_checkpoint("shapes", tmp_path / "checkpoint")

    def export(target: str, variant: str | None) -> Path:
        bundle = tmp_path / f"{target}-{variant or 'base'}"
        export_bundle(checkpoint, bundle, ExportOptions(targets=(target,), quantize=(variant,) if variant else (), jobs=1, progress=False))
        return bundle

    float32 = evaluate_bundle(export("onnx", None), EvaluateOptions(progress=False))
    write_report(float32, tmp_path / "onnx")
    base = float32["rows"]["onnx fp32"]["prompt_accuracy"]
    # the Core ML base (float16) is no quantized variant, so no export gate judges it: evaluated here
    fp16 = evaluate_bundle(export("coreml", None), EvaluateOptions(backend="coreml", held_out_seeds=0, reference=False, progress=False))
    outcomes = {"pytorch": float32["rows"]["pytorch"]["prompt_accuracy"], "coreml fp16": fp16["rows"]["coreml fp16"]["prompt_accuracy"]}
    for target, variant in [("onnx", "int8"), ("onnx", "int4"), ("coreml", "int8"), ("coreml", "int4"), ("coreml", "palette4"), ("coreml", "palette6")]:
        try:
            manifest = json.loads((export(target, variant) / "manifest.json").read_text())
        except ExportError as error:
            assert any(reason in str(error) for reason in REFUSALS), error  # a gate's refusal, not another failure
            outcomes[f"{target} {variant}"] = f"refused: {error}"
            continue
        outcomes[f"{target} {variant}"] = manifest["evaluation"][target][f"{target} {variant}"] / 100  # what its gate measured
    print(format_table(float32), *(f"{name}: {value}" for name, value in outcomes.items()), sep="\n")
    assert base >= 0.95
    for name, accuracy in outcomes.items():
        if not isinstance(accuracy, str):
            assert 100 * (base - accuracy) <= MAX_ACCURACY_LOSS_POINTS, (name, accuracy, base)

"""The runtime's Python API: a bundle in, images out. numpy + onnxruntime (or Core ML), no torch.

    from meissonic.runtimes.pipeline import MeissonicRuntime
    runtime = MeissonicRuntime.from_bundle("bundle/")
    result = runtime.generate("a photo of a cat", steps=48, guidance_scale=9, seed=0)
    result.images[0].save("cat.png")
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .bundle import BundleError, read_manifest, verify_files
from .images import ImageInputError
from .limits import RuntimeInputError, check_request
from .onnx_backend import OnnxBackend, OnnxOptions
from .sampler import Request, Result, Sampler, StepReport
from .tokenizer import CLIPTokenizer

# ort: the bundle's ORT-format models, phone: its fixed-shape phone graphs (both from export --targets ort), run by onnxruntime
BACKENDS = ("onnx", "ort", "phone", "coreml")


class MeissonicRuntime:
    def __init__(self, manifest, backend, tokenizer, low_memory: bool = False):
        self.manifest, self.backend, self.tokenizer = manifest, backend, tokenizer
        self.sampler = Sampler(backend, tokenizer, manifest.model, low_memory=low_memory)

    @classmethod
    def from_bundle(
        cls, bundle, backend: str = "onnx", variant: str | None = None, onnx_options: OnnxOptions | None = None, verify: bool = True,
        low_memory: bool = False,
    ):  # fmt: skip
        """`backend`: onnx, ort (the ORT-format models), phone (the fixed-shape phone graphs) or coreml. `variant`: fp32, fp16, int8, int4 (default: the bundle's base precision). `verify`: check every
        file against the manifest's sha256 before use. `low_memory`: load each graph for its phase only
        (peak memory of the largest graph instead of all of them; reloads on every generation)."""
        if backend not in BACKENDS:
            raise RuntimeInputError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
        if backend == "coreml":
            from .coreml_backend import require_coremltools  # the module itself needs no coremltools to import

            require_coremltools()
        manifest = read_manifest(Path(bundle))
        target = backend
        if target not in manifest.base_variants:
            raise RuntimeInputError(f"this bundle has no {target} graphs (it has {sorted(manifest.base_variants)}); export with --targets {'ort' if target == 'phone' else target}")  # phone graphs come with the ORT ones
        variant = variant or manifest.base_variant(target)
        if variant not in manifest.variants(target):
            raise RuntimeInputError(f"variant {variant!r} is not in this bundle's {target} graphs (it has {manifest.variants(target)})")
        tokenizer_files = [p for p in manifest.files if p.startswith("tokenizer/")]
        if verify:
            verify_files(manifest, tokenizer_files)
        if target in ("onnx", "ort", "phone"):
            backend_impl = OnnxBackend(manifest, variant, onnx_options, verify=verify, target=target)
        else:
            from .coreml_backend import CoreMLBackend

            backend_impl = CoreMLBackend(manifest, variant, verify=verify)
        return cls(manifest, backend_impl, CLIPTokenizer(manifest.root / "tokenizer"), low_memory)

    @property
    def default_size(self) -> tuple[int, int]:
        own = self.manifest.model.defaults.resolution
        if own is not None and own in self.manifest.resolutions:
            return own
        return max(self.manifest.resolutions, key=lambda r: r[0] * r[1])

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        temperature: tuple[float, float] | None = None,
        image=None,
        strength: float = 1.0,
        mask=None,
        progress: bool = True,
        on_step: Callable[[StepReport], bool | None] | None = None,
    ) -> Result:
        """Same parameters and randomness as the reference pipeline with `UniformNoise.from_seed(seed)`.
        What is not given comes from the bundle's generation defaults (the model's own settings, from
        its checkpoint's `generation_config.json`, or the official Meissonic ones); the size defaults to
        the model's resolution, else the bundle's largest."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        defaults = self.manifest.model.defaults
        steps, guidance_scale, temperature = defaults.sampling(steps, guidance_scale, temperature)
        if width is None or height is None:
            width, height = self.default_size
        supported = self.manifest.resolutions
        if (width, height) not in supported:
            listed = ", ".join(f"{w}x{h}" for w, h in supported)
            raise RuntimeInputError(f"size {width}x{height} is not supported by this bundle (exported and validated for {listed})")
        check_request(
            steps=steps, guidance=guidance_scale, temperature=temperature, strength=strength, seed=seed,
            images=len(prompts) * num_images, has_image=image is not None, has_mask=mask is not None,
        )  # fmt: skip
        request = Request(
            prompts=prompts, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            guidance_scale=guidance_scale, num_images=num_images, seed=seed, temperature=tuple(temperature),
            image=image, strength=strength, mask=mask,
        )  # fmt: skip
        return self.sampler(request, progress=progress, on_step=on_step)


__all__ = ["BundleError", "ImageInputError", "MeissonicRuntime", "OnnxOptions", "Result", "RuntimeInputError"]

"""Train the `shapes` demo model: VQ-VAE, CLIP text encoder and Meissonic transformer, on this CPU.

A user-facing example of training the architecture, through the same modules the released model
loads into (`vqvae.VQModel`, `text_encoder.TextEncoder`, `transformer.MeissonicTransformer`: dual- and
single-stream blocks, the 2x downsampling, micro-conditions, rotary positions):

1. VQ-VAE on 128x128 crops of the 256x256 images (reconstruction + codebook + commitment losses, straight-through
   gradients, unused codes restarted from encoder outputs);
2. the training set encoded to 16x16 token grids once;
3. transformer and text encoder together with the MaskGIT objective (the dual-stream blocks' heads started
   as attention to one neighbour each, `init_directional_heads`): mask a cosine-scheduled share of
   the tokens, cross-entropy on the masked ones; 10% of prompts dropped to "" so that classifier-free
   guidance has an unconditional model to push against.

Deterministic from the seed on one machine and thread count (every random draw comes from generators
seeded here). Step counts, not wall time, bound each stage, so a slower machine gives the same model.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTokenizer

from . import shapes, vqvae
from .presets import PRESETS, TOKENIZER_ASSETS, write_checkpoint_folder
from .text_encoder import TextEncoder
from .transformer import MeissonicTransformer
from .vqvae import VQModel

PROMPT_DROPOUT = 0.1
MICRO_CONDS = (256.0, 256.0, 0.0, 0.0, 6.0)  # width, height, crop, aesthetic score: constant in this world
STEP_COUNTS = (8, 12, 16, 24, 32)  # the timestep input is trained for these sampling lengths
GENERATION_CONFIG = "generation_config.json"  # meissonic_export.options.GENERATION_CONFIG
# The settings the model card states, written beside the weights; the export copies them into the bundle.
SHAPES_GENERATION = {"resolution": [256, 256], "steps": 16, "guidance_scale": 3.5, "temperature": [2.0, 0.0], "evaluation": "shapes"}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # the shipped model is trained on the CPU; "cuda" is for trying settings quickly
    vq_steps: int = 2000
    vq_batch: int = 8
    vq_crop: int = 128  # the VQ-VAE is convolutional: crops give 4x the updates per second of whole images
    vq_lr: float = 3e-4
    commitment: float = 0.25
    code_restart_every: int = 25
    images: int = 6000  # the transformer's training set, encoded once
    steps: int = 6000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01


@contextlib.contextmanager
def _fused_group_norm():
    """Train the VQ-VAE with torch's fused group norm: the same statistic as the reference's
    axis-by-axis form (which exists for onnxruntime's float32 drift at 1024 px), 1.6x faster here."""
    original = vqvae.GroupNorm.forward
    vqvae.GroupNorm.forward = lambda self, x: F.group_norm(x, self.groups, self.weight, self.bias, vqvae.GROUP_NORM_EPS)
    try:
        yield
    finally:
        vqvae.GroupNorm.forward = original


def _pixels(images: np.ndarray) -> torch.Tensor:  # [N,H,W,3] uint8 -> [N,3,H,W] float in [0,1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top, left = rng.integers(0, image.shape[0] - size + 1, 2)
    return image[top : top + size, left : left + size]


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vqvae(model: VQModel, config: TrainConfig, progress: bool = True) -> dict[str, list[float]]:
    rng = np.random.default_rng(config.seed + 1)
    # VQGAN's betas: with Adam's default beta2 = 0.999 this autoencoder oscillated and kept predicting the mean color
    optimizer = torch.optim.Adam(model.parameters(), lr=config.vq_lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, config.vq_steps, 20))
    codes = model.quantize.embedding.weight
    used = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)
    history = {"reconstruction": [], "codebook": [], "codes_used": []}
    model.train()
    with _fused_group_norm():
        for step in tqdm(range(config.vq_steps), desc="VQ-VAE", disable=not progress):
            scenes = [shapes.TRAINING_SCENES[i] for i in rng.integers(0, len(shapes.TRAINING_SCENES), config.vq_batch)]
            pixels = _pixels(np.stack([_crop(shapes.render(scene, rng), config.vq_crop, rng) for scene in scenes])).to(config.device)
            latents = model.quant_conv(model.encoder(pixels))  # [B,C,h,w]
            ids = model.quantize.nearest(latents.detach())
            quantized = model.quantize.embedding(ids).permute(0, 3, 1, 2)
            codebook_loss = F.mse_loss(quantized, latents.detach())
            commitment_loss = F.mse_loss(latents, quantized.detach())
            straight_through = latents + (quantized - latents).detach()
            reconstruction = F.mse_loss(model.decoder(model.post_quant_conv(straight_through)), pixels)
            loss = reconstruction + codebook_loss + config.commitment * commitment_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            used[ids.unique()] = True
            history["reconstruction"].append(reconstruction.item())
            history["codebook"].append(codebook_loss.item())
            if (step + 1) % config.code_restart_every == 0 or step + 1 == config.vq_steps:
                history["codes_used"].append(int(used.sum()))
                dead = (~used).nonzero()[:, 0]
                if len(dead) and step + 1 < config.vq_steps:  # restart unused codes at this batch's encoder outputs
                    pool = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
                    pick = torch.from_numpy(rng.choice(len(pool), size=len(dead), replace=len(dead) > len(pool))).to(pool.device)
                    with torch.no_grad():
                        codes[dead] = pool[pick]
                used[:] = False
    return history


@torch.no_grad()
def encode_images(model: VQModel, images: np.ndarray, batch: int = 32, progress: bool = True) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = []
    with _fused_group_norm():
        for start in tqdm(range(0, len(images), batch), desc="encoding", disable=not progress):
            out.append(model.encode(_pixels(images[start : start + batch]).to(device)).cpu())
    return torch.cat(out)


def _mask_batch(tokens: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MaskGIT corruption: a share cos(pi/2 u) of each grid masked, u ~ U(0,1); the timestep the sampler
    would pass at that point of a run of N steps (N drawn from STEP_COUNTS), i.e. N-1-floor(uN)."""
    batch, length = tokens.shape[0], tokens[0].numel()
    u = torch.rand(batch, generator=generator)
    count = (torch.cos(math.pi / 2 * u) * length).ceil().clamp(1, length)
    ranks = torch.rand(batch, length, generator=generator).argsort(-1).argsort(-1)
    masked = (ranks < count[:, None]).reshape(tokens.shape)
    steps = torch.tensor(STEP_COUNTS)[torch.randint(len(STEP_COUNTS), (batch,), generator=generator)]
    timestep = (steps - 1 - (u * steps).floor()).float()
    return torch.where(masked, mask_id, tokens), masked, timestep


# Below, above, right, left, as (row, column) steps on the transformer's (downsampled) grid.
NEIGHBOUR_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))
DIRECTIONAL_BIAS = 3.0  # q/k bias magnitude in the rotary pair that carries a direction
DIRECTIONAL_GAIN = 2.0  # the q/k RMSNorm gains of that pair's dimensions


@torch.no_grad()
def init_directional_heads(transformer: MeissonicTransformer) -> None:
    """Start the dual-stream blocks' first four heads as attention to one neighbour each (below, above,
    right, left); the architecture is unchanged, only where training starts.

    Why: with the default initialization every head averages its neighbours evenly, and an even average
    says how much shape is near, not on which side; the model then blurs edges into blobs (measured on
    ideal tokens at 40% masked: the edge cells cost it 0.59 nats against 0.04 for the best possible
    predictor; docs/shapes_research.md, "Edges, not the shape word"). How: the first rotary pair of the row and column
    axes turns by one radian per cell, so a q bias b(cos d, sin d) against a k bias (b, 0) in that pair
    scores the cell d rows (columns) away highest.
    """
    head_dim = transformer.config.attention_head_dim
    text_dims, row_dims, _ = transformer.config.axes_dims_rope
    row_pair, column_pair = text_dims, text_dims + row_dims  # each axis's first, fastest-turning rotary pair
    for block in transformer.transformer_blocks:
        attention = block.attn
        q_bias, k_bias = attention.to_q.bias.view(-1, head_dim), attention.to_k.bias.view(-1, head_dim)
        for head, direction in zip(range(attention.heads), NEIGHBOUR_DIRECTIONS):
            for pair, offset in zip((row_pair, column_pair), direction):
                q_bias[head, pair : pair + 2] = torch.tensor([DIRECTIONAL_BIAS * math.cos(offset), DIRECTIONAL_BIAS * math.sin(offset)])
                k_bias[head, pair : pair + 2] = torch.tensor([DIRECTIONAL_BIAS, 0.0])
        for norm in (attention.norm_q, attention.norm_k):
            norm.weight[[row_pair, row_pair + 1, column_pair, column_pair + 1]] = DIRECTIONAL_GAIN


def train_transformer(
    transformer: MeissonicTransformer,
    text_encoder: TextEncoder,
    tokens: torch.Tensor,  # [N,H,W] the encoded training set
    prompt_ids: torch.Tensor,  # [N,77]
    empty_ids: torch.Tensor,  # [77] the tokenized "" prompt
    config: TrainConfig,
    progress: bool = True,
) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(config.seed + 2)
    decay = [p for n, p in transformer.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in transformer.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": rest, "weight_decay": 0.0},
            # no decay on the text encoder: token rows the grammar never uses must keep receiving zero updates
            {"params": list(text_encoder.parameters()), "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.99),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, config.steps, config.warmup))
    device = next(transformer.parameters()).device
    micro = torch.tensor([MICRO_CONDS], device=device)
    mask_id = transformer.config.mask_token_id
    history = {"loss": [], "masked_accuracy": []}
    transformer.train()
    text_encoder.train()
    bar = tqdm(range(config.steps), desc="transformer", disable=not progress)
    for _ in bar:
        index = torch.randint(len(tokens), (config.batch,), generator=generator)
        target = tokens[index]
        ids = prompt_ids[index].clone()
        dropped = torch.rand(config.batch, generator=generator) < PROMPT_DROPOUT
        ids[dropped] = empty_ids
        corrupted, masked, timestep = _mask_batch(target, mask_id, generator)
        target, ids, corrupted, masked, timestep = (x.to(device) for x in (target, ids, corrupted, masked, timestep))
        pooled, hidden = text_encoder(ids)
        logits = transformer(corrupted, hidden, pooled, micro.expand(config.batch, -1), timestep)  # [B,K,H,W]
        loss = F.cross_entropy(logits.permute(0, 2, 3, 1)[masked], target[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        schedule.step()
        history["loss"].append(loss.item())
        with torch.no_grad():
            history["masked_accuracy"].append((logits.argmax(1)[masked] == target[masked]).float().mean().item())
        bar.set_postfix(loss=f"{np.mean(history['loss'][-50:]):.3f}")
    transformer.eval()
    text_encoder.eval()
    return history


def _zero_unused_token_rows(text_encoder: TextEncoder, used_ids: torch.Tensor) -> None:
    """Rows of tokens no prompt contains never receive a gradient (and AdamW leaves them as they are
    without decay); zero them from the start so that the shipped file compresses to the rows that matter."""
    weight = text_encoder.clip.text_model.embeddings.token_embedding.weight
    keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[used_ids.unique()] = True
    with torch.no_grad():
        weight[~keep] = 0


def plot_history(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(stage, name, values) for stage, history in histories.items() for name, values in history.items() if values]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, name, values) in zip(axes, panels, strict=True):
        values = np.asarray(values)
        ax.plot(values, lw=0.5, alpha=0.4)
        window = max(1, len(values) // 50)
        if window > 1:
            ax.plot(np.arange(window - 1, len(values)), np.convolve(values, np.ones(window) / window, "valid"), lw=1.5)
        ax.set_title(f"{stage}: {name}", fontsize=9)
        ax.set_xlabel("step")
        if name in ("reconstruction", "codebook", "loss"):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_shapes(out: Path, config: TrainConfig = TrainConfig(), progress: bool = True, overwrite: bool = False) -> dict:
    """Train the three models and write a checkpoint folder at `out` (atomically, through presets'
    writer), with `training/` beside the weights: the config, the measured times and the loss curves.
    torch's thread count and denormal mode are set for the run and restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # denormals slow CPU training by orders of magnitude when a loss collapses
    try:
        return _train(out, config, progress, overwrite)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def _train(out: Path, config: TrainConfig, progress: bool, overwrite: bool) -> dict:
    torch.manual_seed(config.seed)
    preset = PRESETS["shapes"]
    times, started = {}, time.perf_counter()
    vq = VQModel(preset.vqvae).to(config.device)
    clip_config = CLIPTextConfig(**preset.text_encoder)
    text_encoder = TextEncoder(clip_config).to(config.device)
    transformer = MeissonicTransformer(preset.transformer).to(config.device)
    init_directional_heads(transformer)

    histories = {"VQ-VAE": train_vqvae(vq, config, progress)}
    times["vqvae_s"] = time.perf_counter() - started

    scenes, images = shapes.dataset(config.images, config.seed + 3)
    tokens = encode_images(vq, images, progress=progress)
    del images
    times["encode_s"] = time.perf_counter() - started - times["vqvae_s"]

    tokenizer = CLIPTokenizer(str(TOKENIZER_ASSETS / "vocab.json"), str(TOKENIZER_ASSETS / "merges.txt"), pad_token=preset.pad_token)
    prompts = sorted({scene.prompt for scene in shapes.TRAINING_SCENES})
    table = tokenizer(prompts + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    row = {prompt: i for i, prompt in enumerate(prompts)}
    prompt_ids = table[torch.tensor([row[scene.prompt] for scene in scenes])]
    _zero_unused_token_rows(text_encoder, table)
    histories["transformer"] = train_transformer(transformer, text_encoder, tokens, prompt_ids, table[-1], config, progress)
    times["transformer_s"] = time.perf_counter() - started - times["vqvae_s"] - times["encode_s"]
    times["total_s"] = time.perf_counter() - started

    report = {"config": asdict(config), "times": {k: round(v, 1) for k, v in times.items()},
              "final": {"vq_reconstruction_mse": float(np.mean(histories["VQ-VAE"]["reconstruction"][-50:])),
                        "vq_codes_used": histories["VQ-VAE"]["codes_used"][-1],
                        "masked_token_loss": float(np.mean(histories["transformer"]["loss"][-100:])),
                        "masked_token_accuracy": float(np.mean(histories["transformer"]["masked_accuracy"][-100:]))},
              "torch": torch.__version__}  # fmt: skip

    def extras(folder: Path) -> None:
        (folder / GENERATION_CONFIG).write_text(json.dumps(SHAPES_GENERATION, indent=2) + "\n")
        (folder / "training").mkdir()
        (folder / "training" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_history(histories, folder / "training" / "loss_curves.png")

    modules = {"transformer": transformer.cpu(), "vqvae": vq.cpu(), "text_encoder": text_encoder.cpu()}
    write_checkpoint_folder(modules, out, preset.pad_token, extras=extras, overwrite=overwrite)
    return report

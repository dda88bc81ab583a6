"""`lift-fast plan`: will a config's training step fit a GPU, at which activation-checkpointing
policy, how large a batch fits, and how fast must the feed be; worked out without a GPU.

    lift-fast plan model.name=vit_b16 data.image_size=224 train.batch_size=16384 --gpu h100 --gpus 8 --json plan.json

Memory is measured (plan/memory.py: the real step on fake tensors under CUDA's autocast rules), for
each policy at the config's batch per GPU; for auto, where none does not fit, also the checkpointing
of only some blocks (model.grad_checkpointing_blocks: selective on the first k, or full on the first
k and selective on the rest), k read off the line between the two whole-model policies' peaks and
then measured (one step down checked too); the largest batch that fits comes from measurements at
two batches, a straight line (checked at a third batch) and a direct measurement at its answer.
FLOPs come from models/flops.py (what the trainer logs); the step time assumes the GPU runs every
FLOP, recomputed ones included, at `mfu` of its dense bf16 peak (lift_fast/device.py's table).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from lift_fast.config import Config, ConfigError
from lift_fast.plan.memory import measure_step

log = logging.getLogger(__name__)

# What torch.cuda.get_device_properties(0).total_memory reports (GiB) and the dense bf16 TFLOP/s of the
# data sheets (lift_fast/device.py DENSE_BF16_TFLOPS): H100 SXM 80 GB, H200 141 GB, B200 180 GB.
GPUS = {"h100": ("H100 80GB", 79.1, 989.4), "h200": ("H200", 139.8, 989.4), "b200": ("B200", 178.4, 2250.0)}
DEFAULT_MFU = 0.4  # a well-fed ViT-B/16 bf16 step; the step time scales as 1/mfu
# Fraction of the device kept out of the plan: the CUDA context, cuBLAS and NCCL workspaces, the caching
# allocator's fragmentation and DALI's own pool, none of which are tensors of the step.
DEFAULT_MARGIN = 0.10
LINEARITY_TOLERANCE = 0.02  # the third batch's measured peak within 2 % of the line through the first two


@dataclasses.dataclass
class Device:
    """The GPU a plan is for: name, memory (GiB) and dense bf16 peak (TFLOP/s, None when unknown)."""

    name: str
    memory_gib: float
    peak_tflops: float | None


def device_for(gpu: str | None = None, memory_gib: float | None = None) -> Device:
    """--gpu h100|h200|b200 or --memory-gib N (a GPU of that memory, peak FLOP/s unknown).
    Raises ConfigError naming the option for an unknown GPU or neither/both given."""
    if (gpu is None) == (memory_gib is None):
        raise ConfigError("give one of --gpu (h100, h200, b200) or --memory-gib N")
    if gpu is not None:
        if gpu.lower() not in GPUS:
            raise ConfigError(f"--gpu {gpu}: known GPUs are {', '.join(GPUS)}; use --memory-gib N for another")
        name, memory, tflops = GPUS[gpu.lower()]
        return Device(name, memory, tflops)
    if not memory_gib > 0:
        raise ConfigError(f"--memory-gib {memory_gib}: must be > 0")
    return Device(f"{memory_gib:g} GiB GPU", memory_gib, None)


def text_dim(cfg: Config) -> int:
    """The width of the caption embeddings: embed.dim, else the frozen encoder's (built on the meta device)."""
    if cfg.embed.dim:
        return cfg.embed.dim
    from lift_fast.flops import frozen_encoder

    return frozen_encoder(cfg).dim


def step_flops(cfg: Config, dim: int, batch: int, world_size: int, policy: str, blocks: int = 0) -> tuple[int, int]:
    """(model FLOPs of one step on one GPU, FLOPs the policy recomputes on top) at `batch` per GPU,
    the policy on the first `blocks` blocks (0: all; the others recompute no matmul)."""
    from lift_fast.models.flops import train_flops_per_sample, vit_flops_per_image
    from lift_fast.models.vit import vit_spec

    spec = vit_spec(cfg.model.name, patch_size=cfg.model.patch_size, depth=cfg.model.depth)
    common = dict(head_hidden=cfg.model.head_hidden, patch_dropout=cfg.model.patch_dropout, pooling=cfg.model.pooling)
    per_sample = train_flops_per_sample(spec, cfg.data.image_size, dim, batch * world_size, **common)
    recompute = 0
    if policy == "full":  # one more forward of every block (the patch embedding and head are not checkpointed)
        image = vit_flops_per_image(spec, cfg.data.image_size, dim, **common)
        recompute = (image["attention_projections"] + image["attention_matmuls"] + image["mlp"]) * (
            blocks or spec.depth) // spec.depth
    # selective recomputes norms, GELU and casts only: no matmul FLOPs, the only ones counted
    return per_sample * batch, recompute * batch


@dataclasses.dataclass(frozen=True)
class Setting:
    """A checkpointing: `policy` on the first `blocks` of `depth` blocks (0: all), `rest` on the others."""

    policy: str
    blocks: int = 0
    rest: str = "none"
    depth: int = 0

    @property
    def partial(self) -> bool:
        return 0 < self.blocks < self.depth

    @property
    def label(self) -> str:
        """none, selective, full, or e.g. 'full 3/12+selective' (full on 3 of 12 blocks, selective on the rest)."""
        if not self.partial:
            return self.policy
        return f"{self.policy} {self.blocks}/{self.depth}" + ("" if self.rest == "none" else f"+{self.rest}")

    def fields(self) -> dict:
        """model.grad_checkpointing, _blocks (0: all) and _rest as the config takes them."""
        if not self.partial:
            return {"grad_checkpointing": self.policy, "grad_checkpointing_blocks": 0, "grad_checkpointing_rest": "none"}
        return {"grad_checkpointing": self.policy, "grad_checkpointing_blocks": self.blocks,
                "grad_checkpointing_rest": self.rest}


class _Peaks:
    """Measured peaks of one checkpointing Setting by batch, so no batch is measured twice."""

    def __init__(self, cfg: Config, dim: int, setting: Setting, world_size: int):
        self.cfg, self.dim, self.setting, self.world_size = cfg, dim, setting, world_size
        self.measured: dict[int, float] = {}

    def __call__(self, batch: int) -> float:
        if batch not in self.measured:
            fields = self.setting.fields()
            memory = measure_step(self.cfg, batch, self.dim, policy=fields["grad_checkpointing"],
                                  blocks=fields["grad_checkpointing_blocks"], rest=fields["grad_checkpointing_rest"],
                                  world_size=self.world_size)
            self.measured[batch] = memory.peak_gib
        return self.measured[batch]


def max_batch(peaks: _Peaks, budget_gib: float, reference: int) -> int:
    """The largest batch per GPU whose measured peak is within budget_gib (0 when not even 1 fits).

    A line through the peaks at `reference` and half of it (checked at a third batch within
    LINEARITY_TOLERANCE; where it is not straight, a bisection on measured peaks instead) gives a
    guess, which is then moved by single measured steps until it fits and one more does not.
    """
    low, high = max(1, reference // 2), max(2, reference)
    slope = (peaks(high) - peaks(low)) / (high - low)
    intercept = peaks(low) - slope * low
    if slope <= 0:
        raise RuntimeError(f"peak memory did not grow with the batch ({low}: {peaks(low):.3f} GiB, "
                           f"{high}: {peaks(high):.3f} GiB)")
    third = 3 * high
    straight = abs(peaks(third) - (intercept + slope * third)) <= LINEARITY_TOLERANCE * peaks(third)
    if straight:
        guess = max(1, int((budget_gib - intercept) / slope))
    else:
        log.warning("peak memory is not linear in the batch (%s); bisecting", peaks.measured)
        guess = _bisect(peaks, budget_gib)
    step = max(1, guess // 256)
    while guess > 1 and peaks(guess) > budget_gib:
        guess -= step
    if peaks(max(guess, 1)) > budget_gib:
        return 0
    while peaks(guess + step) <= budget_gib:
        guess += step
    return guess


def _bisect(peaks: _Peaks, budget_gib: float) -> int:
    low, high = 1, 2
    while peaks(high) <= budget_gib:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peaks(middle) <= budget_gib else (low, middle)
    return low


def make_plan(cfg: Config, device: Device, *, gpus: int = 1, mfu: float = DEFAULT_MFU,
              margin: float = DEFAULT_MARGIN, search: bool = True) -> dict:
    """The plan of `cfg`'s training step on `gpus` GPUs of `device`.

    Measures each policy (none, selective, full) on all blocks at train.batch_size / gpus per GPU;
    with `search`, also the largest batch per GPU that fits each and the setting chosen (not the
    settings auto only tried: their max_batch_per_gpu is None). The checkpointing it assumes is the config's (model.grad_checkpointing, _blocks, _rest), or for auto the least
    recomputed FLOPs whose peak fits within (1 - margin) of the device's memory: none; else
    selective on the fewest blocks; else full on the fewest blocks and selective on the rest
    (_least_recompute); full on all when nothing fits. Returns a dict: peak_memory_gib, fits,
    grad_checkpointing, grad_checkpointing_blocks (0: all), grad_checkpointing_rest,
    max_batch_per_gpu, flops_per_step, recompute_flops_per_step, recompute_fraction, mfu,
    step_seconds_at_mfu, images_per_second_needed (per GPU), the device, and `policies` (the same
    figures for every setting measured, by label: 'none', 'full', 'full 3/12+selective', ...).
    Raises ConfigError for a bad config, a batch that does not split over the GPUs, or an
    mfu/margin outside (0, 1).
    """
    from lift_fast.models.vit import CHECKPOINT_POLICIES, block_policies, vit_spec
    from lift_fast.train.build import local_batch_size

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: a fraction of the GPU's peak in (0, 1]")
    if not 0 <= margin < 1:
        raise ConfigError(f"--margin {margin}: a fraction of the GPU's memory in [0, 1)")
    batch = local_batch_size(cfg, gpus)
    dim = text_dim(cfg)
    budget = device.memory_gib * (1 - margin)
    depth = vit_spec(cfg.model.name, patch_size=cfg.model.patch_size, depth=cfg.model.depth).depth
    requested = cfg.model.grad_checkpointing
    rows: dict[str, dict] = {}
    peaks_of: dict[str, _Peaks] = {}

    def measure(setting: Setting) -> dict:
        """The plan's row of `setting` (measured once at the batch), kept in rows under its label."""
        if setting.label not in rows:
            peaks = peaks_of[setting.label] = _Peaks(cfg, dim, setting, gpus)
            model_flops, recompute = step_flops(cfg, dim, batch, gpus, setting.policy, setting.blocks)
            row = {**setting.fields(), "peak_memory_gib": round(peaks(batch), 3), "fits": peaks(batch) <= budget,
                   "max_batch_per_gpu": None,
                   "flops_per_step": model_flops, "recompute_flops_per_step": recompute,
                   "recompute_fraction": round(recompute / model_flops, 4)}
            if device.peak_tflops:
                seconds = (model_flops + recompute) / (mfu * device.peak_tflops * 1e12)
                row.update(step_seconds_at_mfu=seconds, images_per_second_needed=batch / seconds)
            else:
                row.update(step_seconds_at_mfu=None, images_per_second_needed=None)
            rows[setting.label] = row
        return rows[setting.label]

    if requested == "auto":
        for policy in CHECKPOINT_POLICIES:
            measure(Setting(policy, depth=depth))
        chosen = _least_recompute(measure, rows, depth, budget)
    else:
        blocks, rest = cfg.model.grad_checkpointing_blocks, cfg.model.grad_checkpointing_rest
        block_policies(requested, depth, blocks, rest)  # ConfigError for blocks over the depth
        setting = Setting(requested, blocks % depth, rest, depth)
        measure(setting)
        chosen = setting.label
    if search:  # the whole-model policies and the setting chosen; not the settings auto only tried
        for label in dict.fromkeys([*(CHECKPOINT_POLICIES if requested == "auto" else ()), chosen]):
            rows[label]["max_batch_per_gpu"] = max_batch(peaks_of[label], budget, batch)
    return {"config": {"model": cfg.model.name, "image_size": cfg.data.image_size, "text_dim": dim,
                       "global_batch": cfg.train.batch_size, "batch_per_gpu": batch, "gpus": gpus, "depth": depth,
                       "precision": "fp32" if cfg.train.precision == "fp32" else "bf16"},
            "device": {"name": device.name, "memory_gib": device.memory_gib, "budget_gib": round(budget, 3),
                       "margin": margin, "peak_tflops": device.peak_tflops},
            "setting": chosen, "requested": requested, **rows[chosen], "mfu": mfu, "policies": rows}


def _least_recompute(measure, rows: dict, depth: int, budget: float) -> str:
    """The label of the setting with the least recomputed matmul FLOPs whose peak fits `budget`, from
    rows of none, selective and full on all blocks (measured): none if it fits; else selective on
    the fewest blocks (no recomputed matmul; the rest none); else full on the fewest blocks, the rest
    selective (selective's peak is the lower one to build on, at no FLOPs); full when nothing fits.

    The peak is close to linear in the number of blocks checkpointed: k comes from the line between
    the two whole-model peaks, is measured, moved up one block at a time until it fits, and down
    while one block fewer fits. `measure(Setting)` measures and adds a row.
    """
    none, selective, full = (rows[policy] for policy in ("none", "selective", "full"))
    if none["fits"]:
        return "none"
    if selective["fits"]:
        policy, rest, low, high = "selective", "none", none, selective
    elif full["fits"]:
        policy, rest, low, high = "full", "selective", selective, full
    else:
        return "full"
    slope = (low["peak_memory_gib"] - high["peak_memory_gib"]) / depth  # GiB saved per block checkpointed
    blocks = min(depth, max(1, math.ceil((low["peak_memory_gib"] - budget) / slope))) if slope > 0 else depth

    def fits(k: int) -> bool:
        return k >= depth or measure(Setting(policy, k, rest, depth))["fits"]

    while not fits(blocks):
        blocks += 1
    while blocks > 1 and fits(blocks - 1):
        blocks -= 1
    return Setting(policy, blocks % depth, rest, depth).label


def format_plan(plan: dict) -> str:
    """The plan as a plain-text table (one row per checkpointing measured) and the one chosen."""
    c, d = plan["config"], plan["device"]
    lines = [f"{c['model']} at {c['image_size']} px, text dim {c['text_dim']}, {c['batch_per_gpu']} images per GPU "
             f"x {c['gpus']} GPU(s), {c['precision']}; {d['name']}: {d['memory_gib']:g} GiB, plan within "
             f"{d['budget_gib']:g} GiB ({d['margin']:.0%} kept free)",
             f"{'checkpointing':<22}{'peak GiB':>10}{'fits':>6}{'max batch/GPU':>15}{'TFLOPs/step':>13}"
             f"{'recompute':>14}{'step s':>9}{'images/s/GPU':>14}"]
    for label, row in plan["policies"].items():
        seconds, rate, most = row["step_seconds_at_mfu"], row["images_per_second_needed"], row["max_batch_per_gpu"]
        recompute = f"{row['recompute_flops_per_step'] / 1e12:.1f} ({row['recompute_fraction']:.0%})"
        lines.append(f"{label:<22}{row['peak_memory_gib']:>10.2f}{'yes' if row['fits'] else 'no':>6}"
                     f"{'-' if most is None else most:>15}{row['flops_per_step'] / 1e12:>13.1f}{recompute:>14}"
                     f"{'-' if seconds is None else f'{seconds:.3f}':>9}{'-' if rate is None else f'{rate:.0f}':>14}")
    how = "chosen by auto" if plan["requested"] == "auto" else "as set"
    lines.append(f"model.grad_checkpointing={plan['grad_checkpointing']} "
                 f"grad_checkpointing_blocks={plan['grad_checkpointing_blocks']} "
                 f"grad_checkpointing_rest={plan['grad_checkpointing_rest']} ({plan['setting']}, {how}): "
                 f"{'fits' if plan['fits'] else 'does NOT fit'}, recompute +{plan['recompute_fraction']:.0%} FLOPs "
                 f"(TFLOPs/step and recompute in TFLOPs; step time at MFU {plan['mfu']:.0%} of the dense bf16 peak, "
                 "recomputed FLOPs included)")
    return "\n".join(lines)


def run_plan(cfg: Config, *, gpu: str | None, memory_gib: float | None, gpus: int = 1, mfu: float = DEFAULT_MFU,
             margin: float = DEFAULT_MARGIN, json_path: str | Path | None = None, search: bool = True) -> dict:
    """What `lift-fast plan` does: make_plan, print the table, write the JSON to json_path if given."""
    plan = make_plan(cfg, device_for(gpu, memory_gib), gpus=gpus, mfu=mfu, margin=margin, search=search)
    print(format_plan(plan))
    if json_path is not None:
        from lift_fast.atomic import write_text

        write_text(json_path, json.dumps(plan, indent=2) + "\n")
    return plan

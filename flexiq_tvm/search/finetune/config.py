"""Finetuning options (no torch needed to build or read them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

METHODS = ("block", "model")
ROUNDINGS = ("ste", "learned")


@dataclass
class FinetuneConfig:
    """How `fq.quantize(..., finetune=...)` trains the plan's INT8 codes for all ratio levels at once.

    method: "block" (default): block-wise reconstruction, one residual block at a time (cut where a
        single tensor carries the graph forward, at least `block_layers` FlexiQ layers a block), each
        block's output matched to FP32 (MSE; the last block: KL of the logits), its input the already
        finetuned quantized model's at the same level. "model": end-to-end distillation of the logits
        (KL to FP32) on augmented calibration inputs. Measured here (benchmarks/finetune.py): on
        MobileNetV2 (45 training crops) "block" lowered the held-out loss at ratio 0.5 from 0.33 to
        0.18 and 0.75 from 0.85 to 0.33 in 7.6 min, while "model" (lr 0.1) did not lower it at all
        before early stopping; on the demo CNN "model" likewise found no held-out improvement.
    epochs: passes over the training part of the calibration set (per block for "block").
    lr: Adam step size of the latent INT8 codes, in code units (rounding "ste" and method "model").
    scale_lr: Adam step size of the log per-output-channel weight scales (0: scales fixed).
    bias: train a per-level bias correction too (stored as the plan's bias_correction).
    holdout: share of the calibration inputs held out (never trained on); training stops when their
        loss has not improved for `patience` evaluations, and the best state is kept. If the final
        held-out distillation loss (mean over levels) is worse than before, the plan is left unchanged.
    levels_per_step: ratio levels sampled per step (the loss sums over them).
    augment: random flips / resized crops of 4-D image inputs ("model" method only).
    max_seconds: stop (keeping the best state) after this much training time.
    train_copies: "block" only: the training inputs plus `train_copies - 1` randomly flipped /
        resized-crop copies of each (4-D images), generated once before the block inputs are cached,
        so that a block sees more varied inputs for the same number of steps (steps per epoch stay
        those of the original training inputs). 1: no copies.
    holdout_by_source: when the calibration inputs come from an image folder whose files are named
        `<photo>_<NN>.<ext>` (crops of one photo, as examples/mobilenetv2_imagenet.py writes them),
        hold out whole photos rather than crops: crops of a training photo would make the held-out
        loss (early stopping, the keep/revert guard) overstate generalisation. Off by default: on
        MobileNetV2 (benchmarks/README.md, `finetune.py`, seeds 0 and 1) it stopped training earlier,
        which raised agreement at ratios 0 and 0.25 (83.5 -> 89.3%, 70.6 -> 78.6%, mean of the
        seeds) but lowered it at 0.5 (65.6 -> 59.0%), the level the bars are set at.
    code_radius: if set, each latent INT8 code stays within this many code units of its starting
        value (AdaRound-like: with few calibration inputs, unbounded codes overfit them).
    level_power: per-level loss weight = 1 / initial loss ** level_power (1: every level's loss
        relative to where it started, which favours INT8; < 1 moves weight toward higher ratios).
    final_epochs: "block" only: after the blocks, this many epochs of end-to-end logit distillation
        (the "model" method, lr `final_lr`, augmented inputs) to correct the error the blocks
        accumulate; 0: none.
    ascale_lr: Adam step size of the log activation scales (LSQ-like; 0: fixed, the plan's).
    rounding: how the INT8 codes are trained. None: "learned" for "block", "ste" for "model".
        "ste": the latent INT8 codes move by straight-through steps of `lr` code units. "learned":
        AdaRound on the 4-bit codes: one soft up/down variable per weight decides its 4-bit code, the
        INT8 code is the plan's code clamped into that 4-bit code's bucket (so it moves only where the
        4-bit code flips), and an annealed regulariser settles every variable on 0 or 1 (see
        QuantLayer.enable_learned_rounding). Measured on MobileNetV2 (benchmarks/README.md, two
        seeds): KL to FP32 at ratios 0.5 / 0.75 of 0.412 / 0.918 against "ste"'s 0.436 / 0.926 (mean
        of the seeds), less than the seed-to-seed swing: a tie, decided by the invariants.
    round_steps: "learned": optimiser steps per block (0: epochs x steps per epoch).
    round_lr: "learned": Adam step size of the rounding variables.
    round_reg: "learned": weight of AdaRound's regulariser (per layer, mean over its weights).
    round_warmup: "learned": share of the steps before the regulariser starts.
    keep_int8: a block's state whose held-out loss at INT8 (ratio 0) is more than 10% above the
        block's starting one is never kept, and the finetuned plan is dropped if the model's held-out
        INT8 loss rose by more than 10%: the weighted mean alone let the higher levels buy their gains
        with INT8 (MobileNetV2 with two more calibration photos: held-out INT8 KL 0.026 -> 0.053 while
        the mean fell).
    """

    method: str = "block"
    epochs: int = 8
    lr: float = 0.1
    scale_lr: float = 1e-3
    bias: bool = True
    batch_size: int = 8
    holdout: float = 0.2
    patience: int = 3
    levels_per_step: int = 2
    augment: bool = True
    block_layers: int = 3
    eval_every: int = 0          # steps between held-out evaluations (0: once per epoch)
    max_seconds: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    train_copies: int = 1
    holdout_by_source: bool = False
    code_radius: Optional[float] = None
    level_power: float = 1.0
    final_epochs: int = 0
    final_lr: float = 0.02
    ascale_lr: float = 1e-3
    rounding: Optional[str] = None
    round_steps: int = 100
    round_lr: float = 0.01
    round_reg: float = 0.01
    round_warmup: float = 0.2
    keep_int8: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"finetune method must be one of {METHODS}, got {self.method!r}")
        if self.rounding is None:
            self.rounding = "learned" if self.method == "block" else "ste"
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"finetune rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding == "learned" and self.method != "block":
            raise ValueError("finetune rounding='learned' needs method='block'")
        if self.rounding == "learned" and self.code_radius is not None:
            raise ValueError("finetune code_radius bounds the 'ste' codes; learned rounding moves a code by at "
                             "most one 4-bit step already (set rounding='ste' to use it)")
        if int(self.round_steps) < 0 or not float(self.round_lr) > 0 or float(self.round_reg) < 0 \
                or not 0.0 <= float(self.round_warmup) < 1.0:
            raise ValueError("finetune round_steps must be >= 0, round_lr > 0, round_reg >= 0, round_warmup in [0, 1)")
        if int(self.epochs) < 1:
            raise ValueError(f"finetune epochs must be >= 1, got {self.epochs}")
        if not float(self.lr) > 0:
            raise ValueError(f"finetune lr must be > 0, got {self.lr}")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ValueError(f"finetune holdout must be in [0, 1), got {self.holdout}")
        if int(self.batch_size) < 1 or int(self.levels_per_step) < 1 or int(self.block_layers) < 1:
            raise ValueError("finetune batch_size, levels_per_step and block_layers must be >= 1")
        if int(self.train_copies) < 1 or int(self.final_epochs) < 0:
            raise ValueError("finetune train_copies must be >= 1 and final_epochs >= 0")
        if self.code_radius is not None and not float(self.code_radius) > 0:
            raise ValueError(f"finetune code_radius must be > 0 or None, got {self.code_radius}")
        self.epochs, self.batch_size = int(self.epochs), int(self.batch_size)
        self.train_copies, self.final_epochs = int(self.train_copies), int(self.final_epochs)

    def to_dict(self) -> dict:
        return asdict(self)


def as_config(finetune) -> Optional[FinetuneConfig]:
    """quantize's `finetune` argument: False/None (off), True (defaults), a dict or a FinetuneConfig."""
    if finetune is None or finetune is False:
        return None
    if finetune is True:
        return FinetuneConfig()
    if isinstance(finetune, FinetuneConfig):
        return finetune
    if isinstance(finetune, dict):
        return FinetuneConfig(**finetune)
    raise TypeError(f"finetune must be a bool, a dict or a FinetuneConfig, got {type(finetune).__name__}")

"""The segmentation model: a volume encoder plus a light per-cell decoder that labels every voxel of the input.

``train.stage: segmentation`` (``training/segmentation.py``) trains it on the release's masks, so that the encoder
learns where each anatomical structure lies before the 3D model is built on it. The decoder is one linear map
per grid cell: the encoder's feature of a cell (width C) becomes ``num_labels`` logits for each voxel of that
cell (``Linear(C, num_labels * cell voxels)``), and ``einops.rearrange`` puts the cells back in their place on the
voxel grid, giving logits ``(B, num_labels, S, H, W)`` at the input size. A voxel's logits therefore come from
the feature of the one cell that holds it; the encoder's attention is what lets that feature see the rest of
the volume. For ``vit3d`` a cell is one patch; for ``swin3d`` one cell of its last stage (input / grid).

The loss is MONAI's ``DiceCELoss`` (softmax, one-hot target, ``lambda_dice`` = ``train.pretrain.dice_weight``,
``lambda_ce`` = 1); ``log_metrics()`` reports the mean foreground Dice of the argmax labels over the steps since
the last call (``label_dice``: what MONAI's ``DiceMetric(include_background=False, ignore_empty=True)`` gives, from
one confusion count per batch instead of its per-label loop, which costs seconds per step at 65 labels).

A trained model is stored as an encoder folder (``OUT/encoder/``: what ``model.encoder.init_from`` reads) next to
``OUT/segmentation_head.safetensors`` (the decoder's weights) and ``OUT/segmentation_head.json`` (``describe()``
plus the labels the training masks held); ``load_segmentation_model`` reads the three back.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

Grid = tuple[int, int, int]

HEAD_FILE = "segmentation_head.json"
HEAD_WEIGHTS = "segmentation_head.safetensors"
ENCODER_DIR = "encoder"
_PATTERN = "b (g0 g1 g2) (k c0 c1 c2) -> b k (g0 c0) (g1 c1) (g2 c2)"
"""Decoder output -> voxel grid: features are in grid order (row-major over g0, g1, g2), and each cell's output
row holds, label by label, that label's logits over the cell's voxels in row-major order."""


def cell_size(input_size: tuple[int, ...] | list[int], grid: tuple[int, ...] | list[int]) -> Grid:
    """Voxels per grid cell along each axis; ValueError naming both when the input is not a multiple of the grid."""
    input_size, grid = tuple(int(v) for v in input_size), tuple(int(v) for v in grid)
    if len(input_size) != 3 or len(grid) != 3 or any(g < 1 or s % g for s, g in zip(input_size, grid)):
        raise ValueError(f"input shape {list(input_size)} is not a multiple of the encoder's feature grid "
                         f"{list(grid)} on every axis; the segmentation decoder gives each grid cell an equal "
                         f"block of voxels")
    return tuple(s // g for s, g in zip(input_size, grid))  # type: ignore[return-value]


class SegmentationModel(nn.Module):
    """A volume encoder plus a per-cell linear decoder to ``num_labels`` voxel logits (see the module docstring).

    ``encoder.config.input_size`` fixes the cell size (input size / the grid the encoder gives it), and so the
    decoder's width; ``dice_weight`` weighs the Dice loss beside the cross-entropy.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dice_weight: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise ValueError(f"num_labels: expected an integer >= 2 (background and one label), got {num_labels!r}")
        if not (isinstance(dice_weight, (int, float)) and math.isfinite(dice_weight) and dice_weight >= 0):
            raise ValueError(f"dice_weight: expected a finite number >= 0, got {dice_weight!r}")
        self.encoder = encoder
        config = encoder.config
        self.input_size: Grid = tuple(int(v) for v in config.input_size)  # type: ignore[assignment]
        self.grid: Grid = tuple(int(v) for v in config.grid_for(self.input_size))  # type: ignore[assignment]
        self.cell = cell_size(self.input_size, self.grid)
        self.num_labels = num_labels
        self.dice_weight = float(dice_weight)
        self.head = nn.Linear(config.hidden_size, num_labels * math.prod(self.cell))
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=self.dice_weight, lambda_ce=1.0)
        self._dice = [0.0, 0]  # sum and count of the per-(volume, label) Dice since the last log_metrics()

    def logits(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, num_labels, S, H, W)`` voxel logits of ``(B, 1, S, H, W)`` volumes."""
        features, grid = self.encoder(volumes)
        grid = tuple(int(g) for g in grid)
        expected = tuple(g * c for g, c in zip(grid, self.cell))
        if tuple(volumes.shape[2:]) != expected:
            raise ValueError(f"volumes of shape {list(volumes.shape[2:])} give the feature grid {list(grid)}; the "
                             f"decoder's cells of {list(self.cell)} voxels need the input {list(expected)} (it was "
                             f"built for {list(self.input_size)})")
        out = self.head(features)  # (B, g0*g1*g2, K * c0*c1*c2)
        g0, g1, g2 = grid
        c0, c1, c2 = self.cell
        return _rearrange(out, g0=g0, g1=g1, g2=g2, c0=c0, c1=c1, c2=c2, k=self.num_labels)

    def forward(self, volumes: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
        """``masks``: integer labels ``(B, 1, S, H, W)`` or ``(B, S, H, W)`` at the input size.

        Returns ``loss``: ``DiceCELoss`` of the logits against the masks (computed in float32).
        """
        target = (masks if masks.ndim == 5 else masks[:, None]).long()
        low, top = int(target.min()), int(target.max())
        if top >= self.num_labels or low < 0:
            raise ValueError(f"masks hold label {top if low >= 0 else low}; the model has num_labels "
                             f"{self.num_labels} (labels 0..{self.num_labels - 1})")
        logits = self.logits(volumes).float()
        loss = self.loss_fn(logits, target)
        with torch.no_grad():
            dice = label_dice(logits.argmax(dim=1), target[:, 0], self.num_labels)
            present = ~torch.isnan(dice)
            self._dice[0] += float(dice[present].sum())
            self._dice[1] += int(present.sum())
        return {"loss": loss}

    def log_metrics(self) -> dict[str, float]:
        """Mean foreground Dice of the argmax labels over the masks seen since the last call (for the log)."""
        total, n = self._dice
        self._dice = [0.0, 0]
        return {"dice": total / n} if n else {}

    def describe(self) -> dict[str, Any]:
        """What ``segmentation_head.json`` records so that the model can be rebuilt and checked."""
        return {"num_labels": self.num_labels, "cell_size": list(self.cell), "grid": list(self.grid),
                "input_size": list(self.input_size), "hidden_size": int(self.encoder.config.hidden_size),
                "encoder_type": str(self.encoder.config.encoder_type), "dice_weight": self.dice_weight}


def label_dice(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(B, num_labels - 1)`` Dice of each foreground label between two integer label maps of the same shape
    ``(B, ...)``: ``2 |P & T| / (|P| + |T|)``, NaN where the label is absent from ``target`` (left out of means).

    One ``bincount`` of the (target, prediction) pairs gives every label's counts at once; the values equal
    MONAI's ``DiceMetric(include_background=False, ignore_empty=True, num_classes=num_labels)``.
    """
    b = pred.shape[0]
    pairs = (target.reshape(b, -1).long() * num_labels + pred.reshape(b, -1).long()
             + torch.arange(b, device=pred.device)[:, None] * num_labels * num_labels)
    counts = torch.bincount(pairs.reshape(-1), minlength=b * num_labels * num_labels)
    confusion = counts.view(b, num_labels, num_labels).double()  # [row, true label, predicted label]
    hits = confusion.diagonal(dim1=1, dim2=2)
    true, predicted = confusion.sum(dim=2), confusion.sum(dim=1)
    dice = 2 * hits / (true + predicted).clamp_min(1)
    return torch.where(true > 0, dice, torch.full_like(dice, float("nan")))[:, 1:]


def _rearrange(out: torch.Tensor, **sizes: int) -> torch.Tensor:
    from einops import rearrange

    return rearrange(out, _PATTERN, **sizes)


def is_segmentation_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the output folder of ``train.stage: segmentation`` (encoder folder and decoder head)."""
    folder = Path(path)
    return (folder / HEAD_FILE).is_file() and (folder / ENCODER_DIR / "config.json").is_file()


def load_segmentation_model(path: str | os.PathLike) -> SegmentationModel:
    """The trained ``SegmentationModel`` of a segmentation output folder, in eval mode, on the CPU.

    Errors name the folder and the file or value that does not fit (missing files, a head of another shape than
    its json and the encoder give).
    """
    from safetensors.torch import load_file

    from .encoders.base import ENCODERS, encoder_config

    folder = Path(path)
    if not is_segmentation_dir(folder):
        raise FileNotFoundError(f"{folder}: not a segmentation output folder (expected {ENCODER_DIR}/config.json, "
                                f"{HEAD_FILE} and {HEAD_WEIGHTS}, as train.stage segmentation writes)")
    enc_dir = folder / ENCODER_DIR
    config = encoder_config(json.loads((enc_dir / "config.json").read_text(encoding="utf-8")))
    encoder = ENCODERS[config.encoder_type][1].from_pretrained(enc_dir)
    try:
        meta = json.loads((folder / HEAD_FILE).read_text(encoding="utf-8"))
        num_labels, dice_weight = int(meta["num_labels"]), float(meta.get("dice_weight", 1.0))
        cell = [int(v) for v in meta["cell_size"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{folder / HEAD_FILE}: expected {{\"num_labels\": int, \"cell_size\": [S, H, W], ...}} "
                         f"({type(err).__name__}: {err})") from None
    try:
        model = SegmentationModel(encoder, num_labels, dice_weight)
    except ValueError as err:
        raise ValueError(f"{folder / HEAD_FILE}: {err}") from None
    if list(model.cell) != cell:
        raise ValueError(f"{folder / HEAD_FILE}: cell_size {cell}, but the encoder in {enc_dir} gives cells of "
                         f"{list(model.cell)} voxels")
    weights_path = folder / HEAD_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: the decoder's weights are missing")
    weights = load_file(str(weights_path))
    own = model.head.state_dict()
    if set(weights) != set(own):
        raise ValueError(f"{weights_path}: tensors {sorted(weights)}, expected {sorted(own)}")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ValueError(f"{weights_path}: {key} has shape {tuple(weights[key].shape)}, expected "
                             f"{tuple(value.shape)} (encoder width {encoder.config.hidden_size}, {num_labels} labels, "
                             f"cells of {cell} voxels)")
    model.head.load_state_dict(weights)
    return model.eval()

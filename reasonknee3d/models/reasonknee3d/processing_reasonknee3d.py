"""ReasonKnee3DProcessor: volumes + prompts (+ answers) -> model inputs, and generated ids -> answer text.

The user turn starts with ``<|vision_start|>`` + ``num_visual_tokens`` x ``<|volume_pad|>`` +
``<|vision_end|>``; the count comes from the model config (``ReasonKnee3DConfig.num_visual_tokens``), so
no model is run here. Answers hold voxel boxes of the ORIGINAL volume (``boxes.box_to_text``); they are
turned into coordinate tokens relative to that shape before encoding, and ``batch_decode`` maps generated
coordinate tokens back to voxel boxes of each original shape. Volumes come preprocessed from the data
layer's cache; a path is preprocessed here with the same settings (``data.transforms``), which are saved
with the processor so a model directory always knows how its inputs were made.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from ...boxes import coord_tokens_to_text, mirror_text_boxes, voxel_text_to_coord_tokens
from ...constants import VISION_END, VISION_START, VOLUME_PAD
from ..chat import decode_answer, encode_example, pad_examples

if TYPE_CHECKING:
    from ...data.frame import VolumeFrame
    from ...data.transforms import PreprocessConfig

Shape = tuple[int, int, int]
VolumeInput = torch.Tensor | np.ndarray | str | Path


class ReasonKnee3DProcessor(ProcessorMixin):
    """Tokenizer + volume settings of one ReasonKnee3D model directory."""

    def __init__(self, tokenizer: Any, volume_size: Sequence[int] = (32, 64, 64), num_visual_tokens: int = 64,
                 num_bins: int = 64, preprocess: Optional[dict[str, Any]] = None, system_prompt: Optional[str] = None,
                 chat_template: Optional[str] = None) -> None:
        """``preprocess``: ``PreprocessConfig`` array settings for raw paths (``input_shape`` = ``volume_size``)."""
        self.volume_size = [int(v) for v in volume_size]
        if len(self.volume_size) != 3:
            raise ValueError(f"volume_size must be (S, H, W), got {volume_size!r}")
        self.num_visual_tokens = int(num_visual_tokens)
        self.num_bins = int(num_bins)
        self.preprocess = dict(preprocess or {})
        self.system_prompt = system_prompt
        if tokenizer.convert_tokens_to_ids(VOLUME_PAD) in (None, tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no {VOLUME_PAD} token: extend it with tokens.add_box_tokens(..., "
                             f"extra=({VOLUME_PAD!r},)) (done by from_qwen2_5_vl / `reasonknee3d init`)")
        super().__init__(tokenizer, chat_template=chat_template)

    @property
    def media(self) -> str:
        """The expanded placeholder string put before the prompt in the user turn."""
        return VISION_START + VOLUME_PAD * self.num_visual_tokens + VISION_END

    def preprocess_config(self) -> "PreprocessConfig":
        """The data layer's ``PreprocessConfig`` this processor's model was trained with."""
        from ...data.transforms import PreprocessConfig
        return PreprocessConfig(**{**self.preprocess, "input_shape": tuple(self.volume_size)})

    def load_volume(self, volume: VolumeInput) -> tuple[torch.Tensor, Shape]:
        """One volume as a ``(1, S, H, W)`` float tensor at ``volume_size`` and the shape its boxes refer to.

        Floating arrays keep their dtype (the float16 cache stays float16 until the model casts it on its
        device); integer arrays become float32.

        A path is loaded and preprocessed (``data.transforms.preprocess_volume``); its original shape is
        the loaded array's. An array must already be preprocessed to ``volume_size``.
        """
        if isinstance(volume, (str, Path)):
            from ...data.transforms import preprocess_volume
            arr, orig_shape = preprocess_volume(volume, self.preprocess_config())
            return torch.from_numpy(arr)[None], tuple(orig_shape)
        t = torch.as_tensor(volume)
        if not t.is_floating_point():
            t = t.float()  # float16 / bfloat16 / float32 pass through: the model casts on its device
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[0] != 1 or list(t.shape[1:]) != self.volume_size:
            raise ValueError(f"volume of shape {tuple(np.shape(volume))}: expected (S, H, W) or (1, S, H, W) = "
                             f"{tuple(self.volume_size)} (preprocess it, or pass its file path)")
        return t, tuple(self.volume_size)

    def __call__(self, volumes: Sequence[VolumeInput] | torch.Tensor, prompts: Sequence[str],
                 answers: Optional[Sequence[str]] = None, orig_shapes: Optional[Sequence[Sequence[int]]] = None,
                 padding_side: Optional[str] = None) -> BatchFeature:
        """Batch of ``input_ids``, ``attention_mask``, ``labels`` (IGNORE_INDEX outside answers), ``volumes``.

        ``orig_shapes``: shape each sample's answer boxes refer to (default: the path's loaded shape, or
        ``volume_size`` for arrays). Padding is on the left without answers (generation) and on the right
        with them (training) unless ``padding_side`` says otherwise.
        """
        if len(volumes) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
            raise ValueError(f"got {len(volumes)} volumes, {len(prompts)} prompts and "
                             f"{'no' if answers is None else len(answers)} answers; expected one of each per sample")
        loaded = [self.load_volume(v) for v in volumes]
        shapes = [s for _, s in loaded] if orig_shapes is None else [tuple(int(x) for x in s) for s in orig_shapes]
        side = padding_side or ("left" if answers is None else "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = []
        for i, prompt in enumerate(prompts):
            answer = None if answers is None else voxel_text_to_coord_tokens(answers[i], shapes[i], self.num_bins)
            rows.append(encode_example(self.tokenizer, prompt, answer, media=self.media, system=self.system_prompt))
        padded = pad_examples(rows, self.tokenizer.pad_token_id, left=side == "left")
        ids, labels, mask = padded["input_ids"], padded["labels"], padded["attention_mask"]
        data = {"input_ids": ids, "attention_mask": mask, "volumes": torch.stack([v for v, _ in loaded])}
        if answers is not None:
            data["labels"] = labels
        return BatchFeature(data=data)

    def mirrors(self, volume: VolumeInput) -> bool:
        """Whether loading ``volume`` mirrors it (a path of the non-canonical knee side when the saved
        preprocessing has ``canonical_side``); pass the flags to ``batch_decode(mirrored=...)``, or use ``frame``,
        which also knows ``recentre``. Arrays are taken as given."""
        if not isinstance(volume, (str, Path)) or not self.preprocess.get("canonical_side"):
            return False
        return self.preprocess_config().mirrors(volume)

    def frame(self, volume: VolumeInput) -> Optional["VolumeFrame"]:
        """The model frame loading ``volume`` puts it in (``data.frame.VolumeFrame``: a path mirrored by the saved
        ``canonical_side``, moved by ``recentre``), or None when its boxes need no mapping (arrays are taken as given;
        preprocessing that neither mirrors nor moves). Pass the frames to ``batch_decode(frames=...)``. With
        ``recentre`` the path is preprocessed to find its offset."""
        if not isinstance(volume, (str, Path)) or not (self.preprocess.get("canonical_side")
                                                       or self.preprocess.get("recentre")):
            return None
        from ...data.frame import VolumeFrame
        cfg = self.preprocess_config()
        if cfg.recentre is not None:
            from ...data.transforms import preprocess_volume_frame
            return preprocess_volume_frame(volume, cfg)[1]
        from ...data.io import inspect_volume
        return VolumeFrame(tuple(inspect_volume(volume).shape), tuple(self.volume_size), cfg.mirrors(volume))

    def batch_decode(self, sequences: torch.Tensor | Sequence[Sequence[int]],
                     orig_shapes: Optional[Sequence[Sequence[int]]] = None,
                     mirrored: Optional[Sequence[bool]] = None,
                     frames: Optional[Sequence[Optional["VolumeFrame"]]] = None) -> list[str]:
        """Generated ids (prompt removed) -> answer texts with voxel boxes of each ``orig_shape``.

        Text stops at the first ``<|im_end|>`` / ``<|endoftext|>``; coordinate-token boxes become
        ``<|box_start|>[a0_min, ...]<|box_end|>`` in the original volume (default: ``volume_size``).
        Rows flagged in ``mirrored`` (``self.mirrors`` of their input) get their boxes mirrored back; rows with a
        frame in ``frames`` (``self.frame`` of their input) get their boxes moved back to the stored voxels
        (``VolumeFrame.text_to_stored``). Give one of the two.
        """
        shapes = orig_shapes or [self.volume_size] * len(sequences)
        flags = list(mirrored) if mirrored is not None else [False] * len(sequences)
        if mirrored is not None and frames is not None:
            raise ValueError("batch_decode: give mirrored or frames, not both (a frame knows whether it mirrors)")
        row_frames = list(frames) if frames is not None else [None] * len(sequences)
        if len(shapes) != len(sequences) or len(flags) != len(sequences) or len(row_frames) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(shapes)} orig_shapes, {len(flags)} "
                             f"mirrored flags and {len(row_frames)} frames")
        texts = [coord_tokens_to_text(decode_answer(self.tokenizer, [int(t) for t in seq]), shape, self.num_bins)
                 for seq, shape in zip(sequences, shapes)]
        texts = [mirror_text_boxes(t, shape) if flag else t for t, shape, flag in zip(texts, shapes, flags)]
        return [t if f is None else f.text_to_stored(t) for t, f in zip(texts, row_frames)]

    def decode(self, sequence: torch.Tensor | Sequence[int], orig_shape: Optional[Sequence[int]] = None) -> str:
        return self.batch_decode([sequence], None if orig_shape is None else [orig_shape])[0]

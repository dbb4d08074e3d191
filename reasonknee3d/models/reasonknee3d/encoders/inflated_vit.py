"""A 2D ViT's weights inflated to a 3D ViT (I3D / ViViT-style inflation) as a volume encoder.

Source: a timm ``vit_*`` ``state_dict`` file (safetensors, or a torch pickle read with ``weights_only``),
read by key layout without importing timm. Why timm rather than the vision tower of a Qwen2.5-VL checkpoint:
a timm ViT block (pre-norm LayerNorm, fused ``qkv`` with bias, GELU MLP, learned absolute position embedding)
is exactly ``vit3d``'s block, so the inflated encoder is ``ViT3DEncoder`` itself, trained and saved like it;
Qwen2.5-VL's tower uses 2D rotary positions, RMSNorm, a SwiGLU MLP and windowed attention, so it has no
absolute position embedding to extend and would need a second encoder implementation.

Inflation (``InflatedViTEncoder.init_from_files``, run when a model is built fresh, never on reload):

- patch embedding ``(C, c_in, p, p)`` -> ``(C, 1, t, p, p)`` with ``t = patch_size[0]``: RGB weights are summed
  (a grey volume reads like a grey image replicated into three channels), then ``central`` puts the kernel on
  the middle depth tap and zeros elsewhere, ``mean`` spreads it over all ``t`` taps divided by ``t``. Either
  way a volume whose slices are all one image gives every depth patch the 2D patch embedding of that image.
- position embedding: the patch part of the 2D embedding (class / register entries dropped), resized
  bicubically to the in-plane patch grid if it differs, repeated on every depth index. It is a full learned
  ``(C, D, H, W)`` grid, so depth positions can separate during training.
- transformer blocks and the final norm: copied; class token, register tokens and the head are not used (the
  encoder returns patch tokens only).

With identical slices every depth row then holds the same tokens, and attention over ``D`` copies of each key
is attention over the keys once, so each depth row of the output equals the 2D ViT's patch-token output on
that image (without its class token). The test checks exactly that.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import register_encoder
from .vit3d import ViT3DConfig, ViT3DEncoder

INFLATION_MODES = ("central", "mean")

# timm key -> ViT3DEncoder key (blocks by index).
_BLOCK_MAP = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "attn.qkv.weight": "attn.qkv.weight",
              "attn.qkv.bias": "attn.qkv.bias", "attn.proj.weight": "attn.proj.weight",
              "attn.proj.bias": "attn.proj.bias", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
              "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias", "mlp.fc2.weight": "fc2.weight",
              "mlp.fc2.bias": "fc2.bias"}
# Top-level keys a timm ViT may carry that the encoder does not use (it returns patch tokens, no pooling head).
_UNUSED = re.compile(r"^(cls_token|reg_token|head\..*|head_drop\..*)$")


class InflatedViTConfig(ViT3DConfig):
    """``vit3d`` whose weights start from a 2D timm ViT file; sizes must match the file (checked on load)."""

    model_type = "reasonknee3d_encoder_inflated_vit"
    encoder_type: str = "inflated_vit"

    init_from_2d: str | None = None
    """timm ViT ``state_dict`` file (``.safetensors``, ``.pth``, ``.bin``) read when the model is built fresh;
    a saved model reloads its own weights and never reads it again."""
    inflation: str = "central"
    """``central`` (2D kernel on the middle depth tap) or ``mean`` (spread over the depth taps, divided by t)."""

    def __post_init__(self, **kwargs) -> None:
        if self.inflation not in INFLATION_MODES:
            raise ValueError(f"encoder_config.inflation {self.inflation!r}: expected one of {INFLATION_MODES}")
        if self.pos_embed != "learned":
            raise ValueError(f"encoder_config.pos_embed {self.pos_embed!r}: inflated_vit extends the 2D ViT's learned "
                             f"position embedding, so it must be 'learned'")
        super().__post_init__(**kwargs)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch pickle (``weights_only``) holding a state dict, possibly
    under ``state_dict`` or ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.init_from_2d: {path} is not a file (expected a timm ViT state_dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"encoder.init_from_2d: {path} holds no state dict of tensors")
    return obj


def _square_grid(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def patch_position_embedding(state: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """``(g, g, C)`` position embedding of the 2D patch grid: ``pos_embed`` without its class / register entries."""
    if "pos_embed" not in state:
        raise ValueError(f"encoder.init_from_2d: {path} has no pos_embed (expected a timm ViT with a learned "
                         f"absolute position embedding)")
    pos = state["pos_embed"].reshape(-1, state["pos_embed"].shape[-1])
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    # timm keeps the prefix entries in pos_embed unless the model was built with no_embed_class.
    for skip in (prefix, 0):
        side = _square_grid(pos.shape[0] - skip)
        if side:
            return pos[skip:].reshape(side, side, -1)
    raise ValueError(f"encoder.init_from_2d: {path}: pos_embed has {pos.shape[0]} entries, which is no square patch "
                     f"grid with or without the {prefix} class/register entries")


def inflate_vit2d(state: dict[str, torch.Tensor], config: InflatedViTConfig,
                  path: str | Path = "<state_dict>") -> dict[str, torch.Tensor]:
    """``ViT3DEncoder`` state dict (every tensor of it) from a timm ViT state dict, inflated as ``config`` says.

    Raises ValueError naming the file, the key, its shape and the expected one for any mismatch, and listing
    keys the 3D ViT has no counterpart for (layer scale, q/k norms, pre-norm ...), which would silently change
    the function if dropped.
    """
    path = Path(path)
    t, ph, pw = config.patch_size
    hidden, layers = config.hidden_size, config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"encoder.init_from_2d: {path} has no {key} (expected a timm vit_* state_dict)")
        value = state[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"encoder.init_from_2d: {path}: {key} has shape {tuple(value.shape)}, the encoder config "
                             f"expects {shape}; set model.encoder.{where} to match the 2D ViT")
        used.add(key)
        return value.float()

    # Patch embedding.
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise ValueError(f"encoder.init_from_2d: {path} has no 4D patch_embed.proj.weight (a 2D ViT's patch conv)")
    c_in = w.shape[1]
    w = take("patch_embed.proj.weight", (hidden, c_in, ph, pw), "hidden_size / patch_size (in-plane)")
    if c_in != config.in_channels:
        if config.in_channels != 1:
            raise ValueError(f"encoder.init_from_2d: {path}: the patch conv takes {c_in} channels, the encoder "
                             f"{config.in_channels}; only 1 input channel can be inflated from a different count")
        w = w.sum(dim=1, keepdim=True)
    if config.inflation == "central":
        kernel = w.new_zeros(hidden, config.in_channels, t, ph, pw)
        kernel[:, :, t // 2] = w
    else:
        kernel = w.unsqueeze(2).expand(-1, -1, t, -1, -1) / t
    out["patch_embed.proj.weight"] = kernel.contiguous()
    out["patch_embed.proj.bias"] = take("patch_embed.proj.bias", (hidden,), "hidden_size")

    # Position embedding: 2D patch grid -> in-plane grid of the config, repeated over depth.
    pos2d = patch_position_embedding(state, path).float()  # (g, g, C)
    used.add("pos_embed")
    if pos2d.shape[-1] != hidden:
        raise ValueError(f"encoder.init_from_2d: {path}: pos_embed has width {pos2d.shape[-1]}, the encoder config "
                         f"hidden_size {hidden}")
    gd, gh, gw = config.grid_size
    grid2d = pos2d.permute(2, 0, 1)[None]  # (1, C, g, g)
    if tuple(grid2d.shape[2:]) != (gh, gw):
        grid2d = F.interpolate(grid2d, size=(gh, gw), mode="bicubic", align_corners=False)
    out["pos_embed"] = grid2d[:, :, None].expand(-1, -1, gd, -1, -1).contiguous()

    # Blocks and the final norm.
    shapes = {"norm1.weight": (hidden,), "norm1.bias": (hidden,), "attn.qkv.weight": (3 * hidden, hidden),
              "attn.qkv.bias": (3 * hidden,), "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
              "norm2.weight": (hidden,), "norm2.bias": (hidden,),
              "mlp.fc1.weight": (config.intermediate_size, hidden), "mlp.fc1.bias": (config.intermediate_size,),
              "mlp.fc2.weight": (hidden, config.intermediate_size), "mlp.fc2.bias": (hidden,)}
    n_blocks = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if n_blocks != layers:
        raise ValueError(f"encoder.init_from_2d: {path} has {n_blocks} transformer blocks, the encoder config "
                         f"num_hidden_layers {layers}")
    for i in range(layers):
        for src, dst in _BLOCK_MAP.items():
            key = f"blocks.{i}.{src}"
            if src == "attn.qkv.bias" and key not in state:
                out[f"blocks.{i}.{dst}"] = torch.zeros(3 * hidden)  # timm ViTs built with qkv_bias=False
                continue
            out[f"blocks.{i}.{dst}"] = take(key, shapes[src], "hidden_size / intermediate_size")
    out["norm.weight"] = take("norm.weight", (hidden,), "hidden_size")
    out["norm.bias"] = take("norm.bias", (hidden,), "hidden_size")

    unknown = sorted(k for k in state if k not in used and not _UNUSED.match(k))
    if unknown:
        raise ValueError(f"encoder.init_from_2d: {path} has tensors the 3D ViT has no counterpart for: {unknown[:6]}"
                         f"{' ...' if len(unknown) > 6 else ''} (supported: a plain timm ViT - pre-norm blocks, "
                         f"final norm, no layer scale, q/k norm or pre-norm)")
    return out


@register_encoder("inflated_vit", InflatedViTConfig)
class InflatedViTEncoder(ViT3DEncoder):
    """``vit3d`` that starts from an inflated 2D ViT (``init_from_files``); forward and saving are ``vit3d``'s."""

    def init_from_files(self) -> None:
        """Load and inflate ``config.init_from_2d`` into this encoder (called when a model is built fresh)."""
        if not self.config.init_from_2d:
            raise ValueError("encoder.init_from_2d: inflated_vit needs the path of a 2D timm ViT state_dict file")
        path = Path(self.config.init_from_2d)
        weights = inflate_vit2d(read_state_dict(path), self.config, path)
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:  # the mapping above covers every tensor of ViT3DEncoder; a new one must be mapped too
            raise RuntimeError(f"inflate_vit2d left encoder tensors unset: {missing}")
        with torch.no_grad():
            for key, value in weights.items():
                own[key].copy_(value.to(own[key].dtype))

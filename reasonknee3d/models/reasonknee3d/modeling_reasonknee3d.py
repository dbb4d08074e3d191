"""ReasonKnee3D: a 3D ViT over the whole knee volume, a projector, and the Qwen2.5-VL language model.

Volume features replace the ``<|volume_pad|>`` placeholder tokens (spliced by token-id mask, never by
position) and carry 3-axis M-RoPE positions (depth, row, column) of their projected grid, so tokens on
different sagittal slices get different positions. Text positions continue after the volume at
``offset + max(D, H, W)`` as in Qwen2-VL. Generation keeps the KV cache: positions are computed once
from the prompt and advanced by one per generated token on every axis.
"""
from __future__ import annotations

import contextvars
import inspect
import itertools
import json
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from ...attention import NO_HUB_KERNELS
from ...constants import BOX_END, BOX_START, VISION_END, VISION_START, VOLUME_PAD
from ..precision import autocast_like, describe_saved_precision, float32_patterns
from ..tiny_qwen import default_tiny_qwen_dir
from .configuration_reasonknee3d import ReasonKnee3DConfig, ReasonKnee3DModelArgs
from .encoders import EncoderConfig, build_encoder, init_encoder_from_files
from .projectors import ProjectorConfig, build_projector
from .region import RegionProjector, box_end_bins, crop_regions, spread_regions

Grid = tuple[int, int, int]

_LANGUAGE_MODEL_LOADED_AFTER = contextvars.ContextVar("reasonknee3d_language_model_loaded_after", default=False)
"""True while ``from_qwen2_5_vl`` builds a model whose language-model tensors it copies from a checkpoint
right after (``_language_model_loaded_after``)."""


@contextmanager
def _language_model_loaded_after():
    """Models built inside leave their language model's parameters uninitialized: the caller copies every one of
    them from a checkpoint next (``_load_language_model``, which checks that none is missing). At Qwen2.5-VL-3B's
    size the random init thrown away that way took 49 of the 50 s of a build on a 2-core CPU (docs/results.md)."""
    token = _LANGUAGE_MODEL_LOADED_AFTER.set(True)
    try:
        yield
    finally:
        _LANGUAGE_MODEL_LOADED_AFTER.reset(token)

# transformers renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` during 5.x and warns
# (FutureWarning) on the old name; the models here accept both names and pass on the one the installed version uses.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2_5_VLTextModel.forward).parameters else "past_key_values"


def _cache_arg(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as one of cache and past_key_values, not both")
    return cache if cache is not None else past_key_values


@dataclass
class ReasonKnee3DModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``rope_deltas`` (B, 1): M-RoPE position minus sequence index of the
    text after the prompt (set when positions were computed from ``input_ids`` in this call)."""

    rope_deltas: torch.LongTensor | None = None
    region_embeds: torch.Tensor | None = None
    """(B, C) region-look feature in force after the last position (zeros for a row without a box so far);
    ``generate`` passes it to the next cached step. None without ``config.region_size``."""


@dataclass
class ReasonKnee3DCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``rope_deltas`` and ``region_embeds`` (see ``ReasonKnee3DModelOutputWithPast``)."""

    rope_deltas: torch.LongTensor | None = None
    region_embeds: torch.Tensor | None = None


class ReasonKnee3DPreTrainedModel(PreTrainedModel):
    config_class = ReasonKnee3DConfig
    config: ReasonKnee3DConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The encoder's own block joins this list when the model is built (transformers collects the children's).
    _no_split_modules = ["Qwen2_5_VLDecoderLayer"]
    # The parts trained from scratch stay float32 under a bfloat16 language model (master weights that small
    # updates do not round away; models/precision.py), also when a bfloat16 folder is loaded.
    _keep_in_fp32_modules_strict = ["encoder", "projector", "region_projector"]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        # Hub kernels stay off unless asked for: on CUDA they are downloaded at run time (attention.NO_HUB_KERNELS).
        for key, value in NO_HUB_KERNELS.items():
            kwargs.setdefault(key, value)
        return super().from_pretrained(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype: the model's configured dtype (``save_pretrained`` writes it to config.json,
        ``from_pretrained`` loads in it), whatever the float32 encoder and projectors hold. A language model partly
        float32 (trained parts beside frozen half-precision ones, ``config.float32_modules``) has the half dtype."""
        owner = self if hasattr(self, "language_model") else getattr(self, "model", None)
        lm = getattr(owner, "language_model", None)
        if lm is None:
            return super().dtype
        dtypes = {p.dtype for p in lm.parameters() if p.is_floating_point()}
        return next(iter(dtypes)) if len(dtypes) == 1 else next(d for d in dtypes if d != torch.float32)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` with the config first saying which weights it writes in float32
        (``precision.describe_saved_precision``: dtype float32 when all are, else ``float32_modules``), so that
        ``from_pretrained`` gives back exactly the saved weights in their dtypes (a fully trained language model
        stays float32 under ``model.dtype: bfloat16``)."""
        describe_saved_precision(self, kept=type(self)._keep_in_fp32_modules_strict)
        return super().save_pretrained(save_directory, *args, **kwargs)

    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class ReasonKnee3DModel(ReasonKnee3DPreTrainedModel):
    """Encoder + projector + Qwen2.5-VL text model; returns the language model's hidden states."""

    def __init__(self, config: ReasonKnee3DConfig) -> None:
        super().__init__(config)
        self.encoder = build_encoder(config.encoder_config)
        self.projector = build_projector(config.projector_config, config.encoder_config.hidden_size,
                                         config.text_config.hidden_size)
        skip_init = _LANGUAGE_MODEL_LOADED_AFTER.get()
        with no_init_weights() if skip_init else nullcontext():
            self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        if skip_init:  # and keep this model's post_init from initializing it either
            for module in self.language_model.modules():
                module._is_hf_initialized = True
        self.region_projector = (None if config.region_size is None else
                                 RegionProjector(config.encoder_config.hidden_size, config.text_config.hidden_size))
        self._bin_of_id: torch.Tensor | None = None
        # Set by a prefill without explicit positions; lets later cached steps continue the M-RoPE positions.
        self.rope_deltas: torch.Tensor | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_volume_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, H, W)`` volumes -> ``(B, N, text_hidden)`` language-model embeddings in grid order."""
        with self._encoder_autocast(volumes.device):
            features, grid = self.encoder(volumes)
            return self.projector(features, grid)

    def _encoder_autocast(self, device: torch.device) -> Any:
        """The float32 encoder and projectors compute in the language model's half dtype on GPU."""
        return autocast_like(self.language_model.norm.weight.dtype, device)

    def bin_of_id(self, device: torch.device) -> torch.Tensor:
        """``(vocab,)`` lookup: the bin of each coordinate token id, -1 for every other id."""
        if self._bin_of_id is None or self._bin_of_id.device != device:
            if not self.config.coord_token_ids:
                raise ValueError("config.coord_token_ids is not set: build the model with from_qwen2_5_vl or "
                                 "`reasonknee3d init` so the tokenizer has the coordinate tokens")
            lookup = torch.full((self.config.text_config.vocab_size,), -1, dtype=torch.long, device=device)
            lookup[torch.tensor(self.config.coord_token_ids, device=device)] = torch.arange(self.config.num_bins,
                                                                                             device=device)
            self._bin_of_id = lookup
        return self._bin_of_id

    def add_region_features(self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor,
                            volumes: torch.Tensor | None, context_ids: torch.LongTensor | None = None,
                            carried: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs_embeds`` with the region look added (``region.py``): each position gets the region feature
        of the latest box closed at or before it, else ``carried`` (B, C; the feature from earlier cached
        steps). Returns the embeddings and the (B, C) feature in force after the last position.

        ``volumes`` has one volume per row (needed only when ``input_ids`` close a box); ``context_ids`` is the
        whole sequence when ``input_ids`` are only its last columns.
        """
        batch, length = input_ids.shape
        if carried is None:
            carried = inputs_embeds.new_zeros(batch, inputs_embeds.shape[-1])
        rows, cols, bins = box_end_bins(input_ids, self.config.box_end_token_id, self.bin_of_id(input_ids.device),
                                        context_ids)
        if rows.numel() == 0:
            if self.training:
                # Keep the region projector in the graph: DDP expects a gradient for every parameter.
                inputs_embeds = inputs_embeds + 0.0 * sum(p.sum() for p in self.region_projector.parameters())
            return inputs_embeds + carried[:, None].to(inputs_embeds.dtype), carried
        if volumes is None or len(volumes) != batch:
            got = "no volumes" if volumes is None else f"{len(volumes)} volumes"
            raise ValueError(f"the region look needs one volume per row to read the boxes this input closes: got "
                             f"{got} for {batch} rows (pass volumes, or region_volumes in cached steps)")
        crops = crop_regions(volumes[rows], bins, self.config.num_bins, self.config.region_size)
        with self._encoder_autocast(crops.device):
            features, _ = self.encoder(crops)  # (n, P, C_enc)
            region = self.region_projector(features)
        added, last = spread_regions(rows, cols, region, length, carried.to(inputs_embeds.dtype))
        return inputs_embeds + added, last

    def get_rope_index(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                       grid: Grid) -> tuple[torch.LongTensor, torch.LongTensor]:
        """3-axis M-RoPE positions ``(3, B, L)`` (depth, row, col) and per-row deltas ``(B, 1)``.

        Text tokens get the same index on all three axes. Each block of ``D*H*W`` volume tokens (grid order)
        gets ``offset + (d, h, w)``; the text after it resumes at ``offset + max(D, H, W)``. Padding
        (``attention_mask == 0``) gets position 0. ``delta = max position + 1 - number of real tokens`` turns
        a plain sequence index into the M-RoPE position for every later text token.
        """
        if self.config.volume_token_id is None:
            raise ValueError("config.volume_token_id is not set: build the model with from_qwen2_5_vl or "
                             "`reasonknee3d init` so the tokenizer has <|volume_pad|>")
        b, length = input_ids.shape
        n_vis = grid[0] * grid[1] * grid[2]
        dev = input_ids.device
        vis = torch.stack(torch.meshgrid(*(torch.arange(g, device=dev) for g in grid), indexing="ij")).reshape(3, -1)
        positions = torch.zeros(3, b, length, dtype=torch.long, device=dev)
        deltas = []
        for row in range(b):
            valid = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(input_ids[row],
                                                                                                   dtype=torch.bool)
            is_vol = (input_ids[row][valid] == self.config.volume_token_id).tolist()
            parts, cur = [], 0
            for volume_run, run in itertools.groupby(is_vol):
                n = len(list(run))
                if not volume_run:
                    parts.append(torch.arange(cur, cur + n, device=dev).expand(3, -1))
                    cur += n
                    continue
                if n % n_vis:
                    raise ValueError(f"row {row} has a run of {n} {VOLUME_PAD} tokens; expected a multiple of "
                                     f"{n_vis} (one volume = projected grid {tuple(grid)})")
                for _ in range(n // n_vis):
                    parts.append(vis + cur)
                    cur += max(grid)
            pos = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long, device=dev)
            positions[:, row, valid] = pos
            deltas.append((pos.max() + 1 if pos.numel() else 0) - len(is_vol))
        return positions, torch.tensor(deltas, device=dev, dtype=torch.long).unsqueeze(1)

    def _continued_positions(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                             past_length: int) -> torch.LongTensor:
        """Positions ``(3, B, L)`` of tokens appended to a cached prefix, from the prefill's rope deltas."""
        b, length = inputs_embeds.shape[:2]
        if attention_mask is not None:
            index = (attention_mask.long().cumsum(-1) - 1)[:, -length:]
        else:
            index = torch.arange(past_length, past_length + length, device=inputs_embeds.device).expand(b, -1)
        return (index + self.rope_deltas.to(index.device)).unsqueeze(0).expand(3, -1, -1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        region_volumes: torch.Tensor | None = None,
        context_ids: torch.LongTensor | None = None,
        region_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        volume_index: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> ReasonKnee3DModelOutputWithPast:
        """Cached generation steps of a model with the region look (``region.py``) also take
        ``region_volumes`` (the volumes, which ``volumes`` only brings to the prefill), ``context_ids`` (the
        whole sequence of which ``input_ids`` are the last columns) and ``region_embeds`` (B, C: the feature
        in force from earlier steps, the previous output's ``region_embeds``). The KV cache comes as ``cache`` or
        (the older name) ``past_key_values``.

        ``volume_index`` (B,) groups questions about the same volume: ``volumes`` then holds each distinct volume
        once and row ``b`` reads ``volumes[volume_index[b]]``, so the encoder runs once per volume; features, loss
        and gradients are those of the batch with every row's volume repeated."""
        past_key_values = _cache_arg(cache, past_key_values)
        if volume_index is not None and volumes is None:
            raise ValueError("volume_index needs volumes (one per distinct volume)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        grid = self.config.visual_grid_for(None if volumes is None else volumes.shape[2:])
        if volumes is not None:
            if input_ids is None:
                raise ValueError("volumes need input_ids: features are spliced at the <|volume_pad|> token ids")
            features = self.get_volume_features(volumes)  # (B, N, C), or (U, N, C) with volume_index
            if volume_index is not None:
                features = features[volume_index.to(features.device)]
            mask = input_ids == self.config.volume_token_id  # (B, L)
            n_tokens, n_features = int(mask.sum()), features.shape[0] * features.shape[1]
            if n_tokens != n_features:
                raise ValueError(f"volume placeholder/feature count mismatch: the input has {n_tokens} "
                                 f"{VOLUME_PAD} tokens but {features.shape[0]} volume(s) gave {n_features} "
                                 f"features ({features.shape[1]} each)")
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds),
                                                         features.to(inputs_embeds.dtype))
        region_source = volumes if volumes is not None else region_volumes
        if volume_index is not None and region_source is not None:
            # Crops are per box: each row's crop is read from its own volume through the index, without copies.
            region_source = _RowVolumes(region_source, volume_index)
        if self.region_projector is not None and input_ids is not None and (
                region_source is not None or region_embeds is not None):
            inputs_embeds, region_embeds = self.add_region_features(input_ids, inputs_embeds, region_source,
                                                                    context_ids, region_embeds)
        rope_deltas = None
        if position_ids is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            if input_ids is not None and past_length == 0:
                position_ids, rope_deltas = self.get_rope_index(input_ids, attention_mask, grid)
                self.rope_deltas = rope_deltas
            elif self.rope_deltas is not None:
                position_ids = self._continued_positions(inputs_embeds, attention_mask, past_length)
        outputs = self.language_model(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache,
                                      **{CACHE_KWARG: past_key_values}, **kwargs)
        return ReasonKnee3DModelOutputWithPast(last_hidden_state=outputs.last_hidden_state,
                                               hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                               rope_deltas=rope_deltas, region_embeds=region_embeds,
                                               **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)})


class _RowVolumes:
    """One volume per row, read from distinct ``volumes`` through ``index`` (B,) without stacking copies."""

    def __init__(self, volumes: torch.Tensor, index: torch.LongTensor) -> None:
        self.volumes, self.index = volumes, index.to(volumes.device)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.volumes[self.index[rows.to(self.index.device)]]


class ReasonKnee3DForConditionalGeneration(ReasonKnee3DPreTrainedModel, GenerationMixin):
    """ReasonKnee3DModel + LM head; ``generate`` keeps the KV cache and the M-RoPE positions."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: ReasonKnee3DConfig) -> None:
        super().__init__(config)
        self.model = ReasonKnee3DModel(config)
        # A head tied to an embedding that from_qwen2_5_vl copies next needs no random init either.
        skip_init = _LANGUAGE_MODEL_LOADED_AFTER.get() and config.tie_word_embeddings
        with no_init_weights() if skip_init else nullcontext():
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if skip_init:
            self.lm_head._is_hf_initialized = True
        self.post_init()
        # What a saved folder holds in float32 beyond the encoder and projectors (config.float32_modules):
        # from_pretrained materializes those weights in float32 instead of rounding them to the folder's dtype.
        self._keep_in_fp32_modules_strict.update(float32_patterns(config.float32_modules))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> ReasonKnee3DCausalLMOutputWithPast:
        """``volumes``: ``(B, 1, S, H, W)`` float, one per sample, in the order of their placeholder blocks.

        ``labels`` use ``IGNORE_INDEX`` for positions without loss and are shifted inside the loss.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, volumes=volumes,
                             position_ids=position_ids, cache=_cache_arg(cache, past_key_values),
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return ReasonKnee3DCausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                  attentions=outputs.attentions, rope_deltas=outputs.rope_deltas,
                                                  region_embeds=outputs.region_embeds,
                                                  **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)})

    # --- generation ---------------------------------------------------------------------------------

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor,
                                             model_kwargs: dict[str, Any]) -> torch.Tensor:
        # generate() calls this once with the whole prompt; each step then appends last + 1 on every axis,
        # which is exactly the M-RoPE continuation, with or without a KV cache.
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.shape[1] == 0:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        volumes = model_kwargs.get("volumes")
        grid = self.config.visual_grid_for(None if volumes is None else volumes.shape[2:])
        positions, self.model.rope_deltas = self.model.get_rope_index(input_ids, model_kwargs.get("attention_mask"),
                                                                      grid)
        return positions

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, volumes: torch.Tensor | None = None,
                                      is_first_iteration: bool = False, **kwargs: Any) -> dict[str, Any]:
        # The KV cache stays in ``kwargs`` under whichever name this transformers version generates with.
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration,
                                                             **kwargs)
        # With a cache only the prefill sees the placeholders; later steps feed one new token each.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["volumes"] = volumes
            model_inputs.pop("region_embeds", None)  # the full sequence recomputes the region look
        elif self.config.region_size is not None and volumes is not None:
            # A fed-back <|box_end|> gets its region feature (it needs the volume and the box's coordinates);
            # later tokens get the carried one (_update_model_kwargs_for_generation).
            model_inputs["region_volumes"] = volumes
            model_inputs["context_ids"] = input_ids
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any],
                                            *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "region_embeds", None) is not None:
            model_kwargs["region_embeds"] = outputs.region_embeds
        return model_kwargs

    # --- building from a Qwen2.5-VL checkpoint ------------------------------------------------------

    @classmethod
    def from_qwen2_5_vl(
        cls,
        path: str | Path,
        encoder_config: EncoderConfig | dict | None = None,
        projector_config: ProjectorConfig | dict | None = None,
        num_bins: int = 64,
        attn_implementation: str = "auto",
        dtype: torch.dtype | str | None = None,
        region_size: Sequence[int] | None = None,
    ) -> tuple["ReasonKnee3DForConditionalGeneration", Any]:
        """A fresh 3D model around the language model of a local Qwen2.5-VL checkpoint directory.

        Reads the checkpoint's text config and tokenizer, adds ``<|volume_pad|>`` and the ``num_bins``
        coordinate tokens, builds encoder and projector from their configs, copies the language model and
        LM head weights from the safetensors files (the vision tower's tensors are never read), and
        initializes the new embedding rows. ``region_size`` turns on the region look (``region.py``).
        Returns ``(model, processor)``.
        """
        from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig

        from ...attention import select_attn_implementation
        from ..tokens import add_box_tokens, init_new_embeddings
        from .processing_reasonknee3d import ReasonKnee3DProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Qwen2.5-VL checkpoint directory: no config.json")
        qwen_config = Qwen2_5_VLConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        old_vocab = len(tokenizer)
        coord_ids = add_box_tokens(tokenizer, num_bins, extra=(VOLUME_PAD,))[:num_bins]
        token_id = tokenizer.convert_tokens_to_ids
        text_config = qwen_config.text_config.to_dict()
        # Qwen's embedding has spare rows past its tokenizer; grow it (to a multiple of 64) only if needed.
        text_config["vocab_size"] = max(text_config["vocab_size"], -(-len(tokenizer) // 64) * 64)
        config = ReasonKnee3DConfig(
            encoder_config=encoder_config, projector_config=projector_config,
            text_config=text_config, num_bins=num_bins, coord_token_ids=coord_ids,
            volume_token_id=token_id(VOLUME_PAD), vision_start_token_id=token_id(VISION_START),
            vision_end_token_id=token_id(VISION_END), box_start_token_id=token_id(BOX_START),
            box_end_token_id=token_id(BOX_END), tie_word_embeddings=qwen_config.tie_word_embeddings,
            region_size=region_size)
        with _language_model_loaded_after():
            model = cls._from_config(config, attn_implementation=select_attn_implementation(attn_implementation),
                                     dtype=dtype)
        # _from_config, unlike from_pretrained, leaves _keep_in_fp32_modules_strict to the caller.
        for name in cls._keep_in_fp32_modules_strict:
            part = getattr(model.model, name, None)
            if part is not None:
                part.float()
        init_encoder_from_files(model.model.encoder)  # after the cast: pretrained weights stay float32
        _load_language_model(model, path)
        init_new_embeddings(model.get_input_embeddings(), model.get_output_embeddings(),
                            list(range(old_vocab, len(tokenizer))), tokenizer)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        processor = ReasonKnee3DProcessor(tokenizer=tokenizer, volume_size=list(config.encoder_config.input_size),
                                          num_visual_tokens=config.num_visual_tokens, num_bins=num_bins)
        return model, processor


# Qwen2.5-VL checkpoints name the text model "model.language_model.*" (transformers 5 layout) or
# "model.*" (the layout of the published Qwen weights); the vision tower is "[model.]visual.*".
_LM_KEY = re.compile(r"^model\.(?:language_model\.)?(?!visual\.)(.+)$")


def _load_language_model(model: ReasonKnee3DForConditionalGeneration, path: Path) -> None:
    """Copy text-model and LM-head tensors from ``path``'s safetensors into ``model``; checks completeness."""
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    lm = model.model.language_model.state_dict()
    loaded: set[str] = set()
    head = None
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight":
                    head = f.get_tensor(key)
                    continue
                m = _LM_KEY.match(key)
                if m is None or m.group(1) not in lm:
                    continue
                src, dst = f.get_tensor(key), lm[m.group(1)]
                if src.shape[1:] != dst.shape[1:] or src.shape[0] > dst.shape[0]:
                    raise ValueError(f"{path / name}: tensor {key} has shape {tuple(src.shape)}; the language model "
                                     f"built from its config.json expects {tuple(dst.shape)}")
                dst[: src.shape[0]].copy_(src)
                if src.shape[0] < dst.shape[0]:
                    # Rows past the checkpoint's (a vocabulary grown for the new tokens) were left uninitialized:
                    # they get the init the language model gives its embeddings (new tokens' rows are set later).
                    dst[src.shape[0]:].normal_(mean=0.0, std=model.config.text_config.initializer_range)
                loaded.add(m.group(1))
    missing = sorted(set(lm) - loaded)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks language-model tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; is it a Qwen2.5-VL checkpoint?")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    elif head is None:
        raise ValueError(f"{path}: no lm_head.weight and tie_word_embeddings is false")
    else:
        model.lm_head.weight.data[: head.shape[0]].copy_(head.to(model.lm_head.weight.dtype))


def build_reasonknee3d(model: ReasonKnee3DModelArgs | dict, data: Any) -> tuple[ReasonKnee3DForConditionalGeneration, Any]:
    """Fresh ``(model, processor)`` from an experiment's ``model:`` and ``data:`` sections (family ``3d``).

    ``model.language_model`` is ``{path: DIR}`` (a local Qwen2.5-VL checkpoint) or ``{tiny: {sizes}}``
    (a tiny Qwen2.5-VL-format checkpoint, deterministic from its seed, is built into the user cache on first
    use and wrapped the same way). ``data`` (the data layer's ``PreprocessConfig``) fixes the input size and the
    preprocessing settings stored in the processor. Mappings in the YAML layout are accepted for both.
    """
    from ...config import from_mapping
    from ...data.transforms import PreprocessConfig

    if isinstance(model, dict):
        model = from_mapping(ReasonKnee3DModelArgs, model, "model")
    if isinstance(data, dict):
        data = from_mapping(PreprocessConfig, data, "data")
    kwargs = model.from_qwen_kwargs(data.input_shape)
    lm = model.language_model
    # The tiny LM is built once into the user cache (default_tiny_qwen_dir): under torchrun every rank reads
    # rank 0's build, since transformers writes model files on rank 0 only.
    lm_path = Path(lm["path"]) if "path" in lm else default_tiny_qwen_dir(**(lm["tiny"] or {}))
    rk_model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(lm_path, **kwargs)
    processor.preprocess = {k: v for k, v in data.array_settings().items() if k != "input_shape"}
    return rk_model, processor

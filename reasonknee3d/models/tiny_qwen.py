"""A tiny, random-init Qwen2.5-VL checkpoint directory that loads exactly like the real 3B one.

No weights can be downloaded in tests or CI, yet every code path should run ``from_pretrained`` on a
Qwen2.5-VL directory. ``build_tiny_qwen2_5_vl`` writes such a directory with ``save_pretrained``:
``Qwen2_5_VLForConditionalGeneration`` (random init, tiny sizes), a byte-level BPE tokenizer trained on a
small corpus of the package's own prompts/answers (with all Qwen special tokens and Qwen's chat template)
and a ``Qwen2_5_VLProcessor``. ``AutoProcessor`` / ``AutoTokenizer`` /
``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`` then behave as on the real checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..answer import diagnosis_json
from ..config import ConfigError, from_mapping
from ..boxes import box_to_text
from ..constants import (ENDOFTEXT, IM_END, IMAGE_PAD, LOCATION_PREFIX, QWEN_SPECIAL_TOKENS, VIDEO_PAD,
                         VISION_END, VISION_START)
from ..schema import load_schema
from ..io_utils import atomic_dir, write_json

# The text part of Qwen2.5-VL-3B-Instruct (its config.json values): the default language model of the 3D-native
# config and the shapes of the real-size benchmark. The one place these sizes are written.
QWEN2_5_VL_3B_TEXT: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})

# The vision tower of Qwen2.5-VL-3B-Instruct (its config.json vision_config) as ``TinyQwenSizes`` fields.
QWEN2_5_VL_3B_VISION: dict[str, Any] = dict(
    vision_hidden_size=1280, vision_intermediate_size=3420, vision_depth=32, vision_num_heads=16,
    vision_fullatt_every=8, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)


def qwen2_5_vl_3b_sizes(layers: Optional[int] = None, vision_layers: Optional[int] = None,
                        width_divisor: int = 1) -> dict[str, Any]:
    """``TinyQwenSizes`` overrides that give ``build_tiny_qwen2_5_vl`` the shapes of Qwen2.5-VL-3B-Instruct:
    text part from ``QWEN2_5_VL_3B_TEXT``, vision tower from ``QWEN2_5_VL_3B_VISION``, the embedding's 151,936
    rows, bfloat16 weights. Only the tokenizer differs (the package's small BPE with Qwen's special tokens).

    ``layers`` / ``vision_layers``: fewer decoder layers / vision blocks (None: the real 36 / 32).
    ``width_divisor``: hidden, MLP and head counts divided by it (1: the real widths; head dims stay 128 and
    80, the embedding keeps every row), for runs that must fit a small machine.
    """
    t, v, d = QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, int(width_divisor)
    if d < 1 or t["num_attention_heads"] % d or v["vision_num_heads"] % d:
        raise ValueError(f"width_divisor {width_divisor}: expected a divisor of the 3B model's head counts "
                         f"({t['num_attention_heads']} text, {v['vision_num_heads']} vision)")
    for name, n in (("layers", layers), ("vision_layers", vision_layers)):
        if n is not None and n < 1:
            raise ValueError(f"{name}: expected >= 1, got {n}")
    heads = t["num_attention_heads"] // d
    sizes = dict(
        hidden_size=t["hidden_size"] // d, intermediate_size=t["intermediate_size"] // d,
        num_hidden_layers=layers or t["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=min(t["num_key_value_heads"], heads), rope_theta=t["rope_parameters"]["rope_theta"],
        max_position_embeddings=t["max_position_embeddings"], vocab_rows=t["vocab_size"], dtype="bfloat16",
        **v)
    sizes.update(vision_hidden_size=v["vision_hidden_size"] // d, vision_intermediate_size=v["vision_intermediate_size"] // d,
                 vision_num_heads=v["vision_num_heads"] // d, vision_depth=vision_layers or v["vision_depth"])
    return sizes


# Qwen2-VL / Qwen2.5-VL chat template as shipped in the official checkpoints (tokenizer_config.json).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSizes:
    """Sizes of the tiny checkpoint (the real Qwen2.5-VL-3B values are in brackets)."""

    hidden_size: int = 64
    """Text hidden size [2048]."""
    intermediate_size: int = 128
    """Text MLP size [11008]."""
    num_hidden_layers: int = 2
    """Text decoder layers [36]."""
    num_attention_heads: int = 4
    """Text attention heads [16]; head_dim = hidden_size / heads."""
    num_key_value_heads: int = 2
    """Text key/value heads (GQA) [2]."""
    rope_theta: float = 1000000.0
    """Rotary base [1e6]. A tiny head_dim leaves only a few rotary frequencies; a smaller base keeps more of
    them fast enough to tell nearby positions apart."""
    max_position_embeddings: int = 8192
    """Longest sequence the rotary tables are sized for [128000]."""
    vision_hidden_size: int = 32
    """Vision tower width [1280]."""
    vision_intermediate_size: int = 64
    """Vision MLP size [3420]."""
    vision_depth: int = 2
    """Vision blocks [32]."""
    vision_num_heads: int = 2
    """Vision attention heads [16]."""
    patch_size: int = 14
    """Vision patch size in pixels [14]."""
    spatial_merge_size: int = 2
    """Patches merged per side into one LLM token [2]."""
    temporal_patch_size: int = 2
    """Frames per temporal patch [2]."""
    tokens_per_second: int = 2
    """Video temporal position step [2]."""
    bpe_vocab_size: int = 1024
    """Byte-level BPE vocabulary learned from the corpus (before special tokens) [151643]."""
    seed: int = 0
    """Seed of the random weights."""
    vocab_rows: int = 0
    """Rows of the (tied) embedding; 0: the tokenizer's size rounded up to 64 [151936]. Rows beyond the
    tokenizer are spare, as in the real checkpoint."""
    vision_fullatt_every: int = 0
    """Every n-th vision block (n-1, 2n-1, ...) attends over the whole frame, the others within windows; the
    last block always does. 0: only the last [8: blocks 7, 15, 23, 31]."""
    dtype: str = "float32"
    """dtype the weights are saved in: float32, bfloat16 or float16 [bfloat16]."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"tiny Qwen: dtype {self.dtype!r}; expected float32, bfloat16 or float16")
        if self.vocab_rows < 0 or self.vision_fullatt_every < 0:
            raise ValueError(f"tiny Qwen: vocab_rows {self.vocab_rows} and vision_fullatt_every "
                             f"{self.vision_fullatt_every} must be >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"tiny Qwen: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"tiny Qwen: head_dim {self.hidden_size // self.num_attention_heads} must be even "
                             "for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"tiny Qwen: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError(f"tiny Qwen: vision_hidden_size {self.vision_hidden_size} is not divisible by "
                             f"vision_num_heads {self.vision_num_heads}")


def check_language_model(lm: Any, where: str = "model.language_model") -> None:
    """Raise ConfigError naming ``where`` unless ``lm`` is ``{path: DIR}`` or ``{tiny: {sizes}}`` with valid sizes."""
    if not isinstance(lm, dict) or len(lm) != 1 or next(iter(lm)) not in ("path", "tiny"):
        raise ConfigError(f"{where}: expected {{path: DIR}} or {{tiny: {{sizes}}}}, got {lm!r:.80}")
    if "tiny" in lm:
        from_mapping(TinyQwenSizes, lm["tiny"], f"{where}.tiny")
    elif not isinstance(lm["path"], str) or not lm["path"]:
        raise ConfigError(f"{where}.path: expected a checkpoint folder, got {lm['path']!r}")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) in Qwen's 1:1.5:1.5 ratio.

    Qwen2.5-VL uses [16, 24, 24] for head_dim 128; the three values must sum to head_dim / 2.
    """
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def default_corpus() -> list[str]:
    """Texts the tiny BPE is trained on: every question prompt, reasoning step and answer shape.

    Uses ``reasonknee3d.prompts`` (the wording of the synthetic release and the zero-shot runners) plus
    answer-shaped lines with boxes and JSON, so the tiny tokenizer splits the package's text like a real
    BPE splits ordinary text: a few characters per token.
    """
    from .. import prompts

    texts: list[str] = []
    for spec in load_schema().values():
        texts += [prompts.question_prompt(spec, style) for style in prompts.PROMPT_STYLES]
        for f in spec.fields:
            for g in f.grades:
                severity = {**{x.key: x.grades[0] for x in spec.fields}, f.key: g}
                texts += prompts.reasoning_steps(spec, severity)
                texts.append(diagnosis_json(spec, severity))
    for i in range(64):
        box = [i, i + 3, 2 * i, 2 * i + 40, 3 * i + 1, 3 * i + 70]
        texts.append(f"{LOCATION_PREFIX} {box_to_text(box)}")
        texts.append(f'{{"box": {box}, "MOAKS_scores": {{"grade": {i % 4}}}}}')
    texts.append("0123456789 [](){}<>,.:;\"'-_+*/%=?! You are a helpful assistant. system user assistant")
    return texts


# The split pattern of the Qwen2 / Qwen2.5 tokenizer.json pre-tokenizer.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE (like Qwen's) wrapped as a transformers fast tokenizer with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer: its split pattern (digits one by one, a space before a digit on its own), then
    # byte-level. Token boundaries then fall where the real tokenizer puts them, e.g. ": 0" -> ":", " ", "0",
    # which the constrained severity decoding relies on.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    # Special tokens after the learned vocabulary, as in the real Qwen tokenizer (ids 151643+).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   bos_token=None, unk_token=None, model_max_length=32768)
    fast.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, corpus: Optional[Iterable[str]] = None,
                          **sizes: int) -> Path:
    """Write a random-init tiny Qwen2.5-VL checkpoint (model, tokenizer, processor) to ``out_dir``.

    ``corpus`` replaces nothing: its texts are added to ``default_corpus()``. ``sizes`` override
    ``TinyQwenSizes`` fields. The directory is written in a temporary sibling and renamed into place, so a
    reader never sees a half-built checkpoint; an existing ``out_dir`` is replaced.
    """
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    s = from_mapping(TinyQwenSizes, dict(sizes), "tiny Qwen sizes")
    texts = default_corpus() + list(corpus or [])
    tokenizer = _train_tokenizer(texts, s.bpe_vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END,
                                                           ENDOFTEXT, IM_END)}
    head_dim = s.hidden_size // s.num_attention_heads
    # Like the real checkpoint, the embedding has spare rows beyond the tokenizer (151936 > 151665), so
    # added tokens first use free rows and resizing is only needed past them.
    vocab_rows = s.vocab_rows or -(-(len(tokenizer) + 1) // 64) * 64
    if vocab_rows < len(tokenizer):
        raise ValueError(f"tiny Qwen: vocab_rows {vocab_rows} is fewer than the tokenizer's {len(tokenizer)} tokens")
    full_attention = sorted({*range(s.vision_fullatt_every - 1, s.vision_depth, s.vision_fullatt_every or
                                    s.vision_depth + 1), s.vision_depth - 1} - {-1})
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_rows, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(s.rope_theta),
                             "mrope_section": mrope_section(head_dim)},
            bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
            tie_word_embeddings=True),
        vision_config=dict(
            depth=s.vision_depth, hidden_size=s.vision_hidden_size, intermediate_size=s.vision_intermediate_size,
            num_heads=s.vision_num_heads, patch_size=s.patch_size, spatial_merge_size=s.spatial_merge_size,
            temporal_patch_size=s.temporal_patch_size, tokens_per_second=s.tokens_per_second,
            window_size=s.patch_size * s.spatial_merge_size * 4, out_hidden_size=s.hidden_size,
            fullatt_block_indexes=full_attention),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True)
    torch.manual_seed(s.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, s.dtype))
    model.generation_config.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]

    pixel_kwargs = dict(patch_size=s.patch_size, merge_size=s.spatial_merge_size,
                        temporal_patch_size=s.temporal_patch_size)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixel_kwargs),
                                    video_processor=Qwen2VLVideoProcessor(**pixel_kwargs),
                                    tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # transformers writes a model's config and weights only on rank 0 of an initialized process group
        # (PreTrainedModel.save_pretrained ignores is_main_process there); never publish such a partial folder.
        missing = [f for f in ("config.json", "tokenizer.json") if not (tmp / f).is_file()]
        missing += [] if any(tmp.glob("model*.safetensors")) else ["model.safetensors"]
        if missing:
            rank, world = _process_rank()
            raise RuntimeError(f"building the tiny Qwen checkpoint {out_dir}: save_pretrained wrote no {missing} "
                               f"(process rank {rank} of {world}; transformers saves models on rank 0 only, so "
                               f"build on rank 0, e.g. through default_tiny_qwen_dir)")
    return Path(out_dir)


CACHE_ENV = "REASONKNEE3D_CACHE"
"""Environment variable naming the folder that holds this package's caches (tiny checkpoints)."""

TINY_BUILD_MARKER = "reasonknee3d_tiny_qwen.json"
"""File written last into a cached tiny checkpoint: what it was built from. A folder without it is not used."""

TINY_BUILD_FORMAT = 1
"""Bumped when ``build_tiny_qwen2_5_vl`` changes what it writes, so older cached folders are not reused."""


def user_cache_dir() -> Path:
    """Folder for this package's caches: ``$REASONKNEE3D_CACHE``, else ``$XDG_CACHE_HOME/reasonknee3d``, else
    ``~/.cache/reasonknee3d``. Never the current directory, so runs do not leave files where they were started."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "reasonknee3d"


def tiny_qwen_build_info(sizes: TinyQwenSizes) -> dict[str, Any]:
    """Everything the bytes of a tiny checkpoint depend on: all sizes (seed included), the corpus its BPE is
    trained on, the build format and the versions of the libraries that initialize, train and save it.

    A cached checkpoint is reused only when all of these match, so a cached folder always equals a fresh build.
    """
    from importlib.metadata import version

    corpus = hashlib.sha256(json.dumps(default_corpus(), ensure_ascii=False).encode()).hexdigest()
    return {"format": TINY_BUILD_FORMAT, "sizes": dataclasses.asdict(sizes), "corpus_sha256": corpus,
            "versions": {name: version(name) for name in ("torch", "transformers", "tokenizers", "safetensors")}}


def _process_rank() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_complete(path: Path) -> bool:
    return (path / TINY_BUILD_MARKER).is_file() and (path / "config.json").is_file()


def _build_into(path: Path, sizes: dict[str, Any], info: dict[str, Any]) -> None:
    """Build in a private temporary sibling and rename it to ``path``; if another process renamed its own
    (identical) build there first, keep that one and drop ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".build", dir=path.parent))
    try:
        built = build_tiny_qwen2_5_vl(staging / "checkpoint", **sizes)
        write_json(built / TINY_BUILD_MARKER, info)
        try:
            os.rename(built, path)
        except OSError as err:
            if not _is_complete(path):
                raise FileExistsError(f"{path} exists but is not a complete tiny Qwen checkpoint (no "
                                      f"{TINY_BUILD_MARKER}); remove it and run again") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_tiny_qwen_dir(root: Optional[str | os.PathLike] = None, build: bool = True,
                          wait_s: float = 600.0, **sizes: int) -> Path:
    """``<root>/checkpoints/tiny-qwen2.5-vl-<fingerprint>``, built on first use and reused afterwards.

    ``root`` defaults to ``user_cache_dir()`` (``$REASONKNEE3D_CACHE`` overrides it). The fingerprint covers
    ``tiny_qwen_build_info``: configs with different sizes, and installs with different library versions,
    never share or overwrite each other's checkpoint, and a reused folder equals a fresh build.

    Several processes may ask at once. Without a process group, each one that finds no complete folder builds
    one in a private temporary sibling and renames it into place; the first rename wins (the builds are
    identical). Under an initialized torch.distributed process group only rank 0 builds: transformers'
    ``save_pretrained`` writes no config or weights on any other rank, even into a rank-private folder. The
    other ranks wait (up to ``wait_s`` seconds) for rank 0's folder to appear, polling the file system rather
    than joining a collective, so it does not matter which ranks call this or in what order.
    """
    s = from_mapping(TinyQwenSizes, dict(sizes), "tiny Qwen sizes")  # reject unknown keys before naming a folder after them
    info = tiny_qwen_build_info(s)
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(root if root is not None else user_cache_dir()).expanduser() / "checkpoints" / f"tiny-qwen2.5-vl-{digest}"
    if not build or _is_complete(path):
        return path
    rank, world = _process_rank()
    if rank == 0:
        _build_into(path, sizes, info)
        return path
    deadline = time.monotonic() + wait_s
    while not _is_complete(path):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank} of {world}: waited {wait_s:.0f} s for rank 0 to build the tiny Qwen checkpoint "
                f"{path}; every rank must see the same cache folder (set {CACHE_ENV} to a folder shared by all "
                f"nodes, or build it once per node before launching, e.g. `reasonknee3d init`)")
        time.sleep(0.2)
    return path

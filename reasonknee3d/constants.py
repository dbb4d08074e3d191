"""Names and numbers shared by every part of the package (one place each)."""
from __future__ import annotations

VERSION = "0.1.0"
"""The package version (``reasonknee3d.__version__``), here so that low layers can name it."""

# Loss masking value understood by torch.nn.CrossEntropyLoss and transformers.
IGNORE_INDEX = -100

# Array axes of a loaded volume: (S, H, W) = sagittal slice, row, column.
AXIS_NAMES = ("slice", "row", "col")

# Qwen2.5 special tokens the package relies on (they exist in every Qwen2.5-VL tokenizer).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", BOX_START, BOX_END,
    "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD,
)

# Placeholder the 3D processor expands into one token per projected volume feature.
VOLUME_PAD = "<|volume_pad|>"

# Coordinate tokens: COORD_TOKEN_FORMAT.format(bin) for bin in range(K).
COORD_TOKEN_FORMAT = "<|coord_{}|>"

# Text labels of the answer format (answer.py; docs/design.md).
LOCATION_PREFIX = "Location:"
DIAGNOSIS_PREFIX = "Final diagnosis:"

# Severity key used for questions whose schema field key is null (docs/benchmark.md).
NULL_FIELD_KEY = "grade"

# Version of the scoring spec implemented by reasonknee3d.evaluation.
BENCH_VERSION = "1.0"

BOX_DECODINGS = ("median", "argmax")
"""How a generated box coordinate is chosen among the bins the box still allows: ``median`` forces the median bin
of the model's distribution; ``argmax`` leaves it to the decoding strategy (greedy: the most probable bin).
Coordinates are ordinal: when that distribution is broad, its mode jumps between distant bins from one volume to
the next while its median, the choice with the least expected absolute error in bins, stays near its centre."""
DEFAULT_BOX_DECODING = "median"
"""What ``predict``, ``infer`` and ``answer_question`` use unless told otherwise: on the demo's tiny 3D-native
model the median raised mean IoU from 0.279 to 0.301 (docs/results.md, "Median box decoding")."""

"""The paper's 2D-slice baseline: stock Qwen2.5-VL over sagittal slices (config, inputs, feature cache, model)."""

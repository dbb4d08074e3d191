"""The 3D-native model: volume encoder (``encoders/``) -> projector -> Qwen2.5-VL language model, with box tokens
and the region look."""

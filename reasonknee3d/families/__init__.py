"""Model families: the one registry of what ``family:`` in an experiment can name.

Importing this package registers the built-in families (``3d``, ``slice``). A new family subclasses
``Family`` and decorates itself with ``@register_family("name")``; see docs/design.md.
"""
from . import slice, threed  # noqa: F401  (registration)
from .experiment import (ExperimentConfig, experiment_from_dict, load_experiment_config, preset_names,
                         resolve_config, save_experiment_config)
from .registry import Family, SampleInfo, family_names, family_of_model_dir, get_family, register_family

__all__ = ["ExperimentConfig", "Family", "SampleInfo", "experiment_from_dict", "family_names", "family_of_model_dir",
           "get_family", "load_experiment_config", "preset_names", "register_family", "resolve_config",
           "save_experiment_config"]

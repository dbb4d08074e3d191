"""reasonknee3d: vision-language models that reason over 3D knee MRI (3DReasonKnee).

The package root stays import-light so that commands such as ``reasonknee3d score`` start without torch.
Model classes and the one-call API ``reasonknee3d.answer_question`` are loaded on first access. The transformers Auto
classes (AutoConfig / AutoModel* / AutoProcessor) learn the "reasonknee3d" model type as soon as
transformers is imported — immediately if it already is — so after ``import reasonknee3d`` a saved model
directory loads through the Auto classes in either import order.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from .constants import VERSION as __version__

_LAZY_ATTRS = {
    "ReasonKnee3DConfig": "reasonknee3d.models.reasonknee3d.configuration_reasonknee3d",
    "ReasonKnee3DForConditionalGeneration": "reasonknee3d.models.reasonknee3d.modeling_reasonknee3d",
    "ReasonKnee3DProcessor": "reasonknee3d.models.reasonknee3d.processing_reasonknee3d",
    "answer_question": "reasonknee3d.evaluation.infer",
}
__all__ = ["__version__", *_LAZY_ATTRS]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'reasonknee3d' has no attribute {name!r}")


def _register() -> None:
    from .models import register_auto_classes
    register_auto_classes()


class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Runs the Auto-class registration right after the ``transformers`` module finishes importing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register()
        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterOnTransformersImport())

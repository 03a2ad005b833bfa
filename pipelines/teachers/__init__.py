"""Teacher adapters: everything that knows one diffusers architecture, one file each, one small protocol
(``base.TeacherAdapter``). The training loops, ODE-pair collection, evaluation and the benchmarks all go through
them; nothing else names a diffusers model class."""

from dmdx.training.errors import UsageError

from .base import TeacherAdapter, model_dtype, read_model_index
from .cogvideox import CogVideoXTeacher
from .sd3 import SD3Teacher
from .sdxl import SDXLTeacher
from .wan import WanTeacher

ADAPTERS = {"sdxl": SDXLTeacher, "sd3": SD3Teacher, "cogvideox": CogVideoXTeacher,
            "wan": WanTeacher}


def adapter_for(path: str, what: str = "--pretrained_model_name_or_path", **kwargs) -> TeacherAdapter:
    """The adapter of whatever supported pipeline ``path`` is, chosen from its model_index.json (no weights)."""
    name = read_model_index(path, what, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir")).get(
        "_class_name")
    for cls in ADAPTERS.values():
        if cls.pipeline_class == name:
            return cls(path, what=what, **kwargs)
    raise UsageError(f"{what} {path!r} is a {name!r}; supported teachers: "
                     f"{sorted(c.pipeline_class for c in ADAPTERS.values())}.")

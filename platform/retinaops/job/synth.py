"""data.synth of a job spec: the generated shapes set, and the arguments that make it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from retinaops.job.paths import Section

# SynthSpec field -> make_synthetic_coco argument where the names differ; other fields pass by name.
_ARGUMENTS = {"train": "num_train", "val": "num_val", "classes": "num_classes", "size": "image_size"}


class SynthSpec(Section):
    train: int = Field(64, ge=1, description="Synthetic training images.")
    val: int = Field(16, ge=1, description="Synthetic validation images.")
    classes: int = Field(3, ge=1, le=8, description="Shape classes; model.num_classes must match.")
    size: int = Field(256, ge=64, description="Image side in pixels.")
    seed: int = Field(0, ge=0, description="Seed of the generator: same seed, same images.")
    object_sizes: list[int] | None = Field(None, min_length=2, max_length=2, description="[low, high] sides")

    def arguments(self) -> dict[str, Any]:
        """make_synthetic_coco's keyword arguments (also synth_params'), one per field, lists as tuples."""
        return {
            _ARGUMENTS.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in self.model_dump().items()
        }

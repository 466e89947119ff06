"""Features stage: sliding-window features over samples, with a declared schema."""

from agent.features.schema import DEFAULT_INPUTS, TRANSFORMS, FeatureSchema, InputSpec, default_schema
from agent.features.window import FeatureWindow

__all__ = ["DEFAULT_INPUTS", "TRANSFORMS", "FeatureSchema", "FeatureWindow", "InputSpec", "default_schema"]

"""The main job and its precision step."""

from samedge.pipeline.run import EXPORT_VALIDATION, PipelineResult, run_pipeline

__all__ = ["EXPORT_VALIDATION", "PipelineResult", "run_pipeline"]

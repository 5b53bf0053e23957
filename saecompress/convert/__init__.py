"""Dense SAE → Expander SAE: the projection (``project``) and the file pipeline (``pipeline``)."""

from .pipeline import FVU_MARGIN, ConvertReport, conversion_report, convert_path, source_bytes
from .project import (DEFAULT_D, DEFAULT_ENCODER, DEFAULT_MASK, DEFAULT_PURSUIT_RULE, MASKS, calibrate, convert,
                      kept_energy, recalibrate_thresholds, search_seed, topd_indices)

__all__ = ["DEFAULT_D", "DEFAULT_ENCODER", "DEFAULT_MASK", "DEFAULT_PURSUIT_RULE", "FVU_MARGIN", "MASKS", "ConvertReport", "calibrate",
           "conversion_report", "convert", "convert_path", "kept_energy", "recalibrate_thresholds", "search_seed",
           "source_bytes", "topd_indices"]

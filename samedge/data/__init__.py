"""Medical data in: DICOM, NIfTI, npz and image readers, CT windows, prompts, sampling. No torch."""

from samedge.data.bundled import (
           bundled_calibration_paths,
           bundled_slices,
           bundled_stacks,
           bundled_volume,
)
from samedge.data.items import Item, read_items
from samedge.data.open import (
           load_image,
           open_source,
           open_volume,
           read_stacks,
           volume_stack,
)
from samedge.data.slices import Slice, Volume

__all__ = ["Item", "Slice", "Volume", "bundled_calibration_paths", "bundled_slices",
           "bundled_stacks", "bundled_volume", "load_image", "open_source", "open_volume",
           "read_items", "read_stacks", "volume_stack"]

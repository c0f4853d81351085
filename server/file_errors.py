"""The one exception every model-file reader raises, so callers catch a single type.

A bad file must end in a message that names the file, the tensor and what was expected versus found,
never in a crash deep inside numpy or in silently wrong weights.
"""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file or folder that cannot be loaded as it is (truncated, wrong layout, unsupported type)."""

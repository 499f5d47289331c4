"""medfound.models stage (see DESIGN.md): plain nn.Modules and their builders."""

from medfound.models import detection
from medfound.models.detection import *  # noqa: F403  (the public names are detection.__all__)

__all__ = list(detection.__all__)

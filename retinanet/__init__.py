"""RetinaNet (Lin et al. 2017) in plain PyTorch: `RetinaNet(RetinaNetConfig(...))`."""

from retinanet.config import RetinaNetConfig
from retinanet.model import RetinaNet

__all__ = ["RetinaNet", "RetinaNetConfig"]

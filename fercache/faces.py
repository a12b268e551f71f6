"""Face crops for images that are not cropped already: `predict --detect` and `frames --detect` use the same one,
so a head trained on frames cropped here predicts on images cropped the same way."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def mtcnn_class():
    """facenet-pytorch's MTCNN, or the ConfigError that says how to install it (checked before any work)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise ConfigError("--detect needs facenet-pytorch: pip install 'fercache[detect]'") from None
    return MTCNN


class FaceCropper:
    """MTCNN face detection (facenet-pytorch; its weights ship in the wheel): crop the most confident face."""

    def __init__(self, device: str = "cpu"):
        self.mtcnn = mtcnn_class()(keep_all=False, device=device)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        from PIL import Image

        boxes, _ = self.mtcnn.detect(Image.fromarray(image))
        if boxes is None:
            return image, False
        x0, y0, x1, y1 = (int(round(v)) for v in boxes[0])
        h, w = image.shape[:2]
        return image[max(0, y0):min(h, y1), max(0, x0):min(w, x1)], True

"""Face crops for images that are not cropped already: `predict --detect` and `frames --detect` use the same one,
so a head trained on frames cropped here predicts on images cropped the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def mtcnn_class():
    """facenet-pytorch's MTCNN, or the ConfigError that says how to install it (checked before any work)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise ConfigError("--detect needs facenet-pytorch: pip install 'fercache[detect]'") from None
    return MTCNN


@dataclass(frozen=True)
class Face:
    """The face a crop was cut to: its box in the image (margin included, clipped to the image), in pixels, and
    MTCNN's confidence in it."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    p: float


class FaceCropper:
    """MTCNN face detection (facenet-pytorch; its weights ship in the wheel): crop the most confident face.

    MTCNN lists every face it finds, the largest first; the crop is the one it is surest of, so a large face in the
    background does not win over the subject. `margin` grows the box by that fraction of its width and height on
    each side (0.2: a 40% wider and taller crop), as the datasets' own crops often include hair and chin."""

    def __init__(self, device: str = "cpu", margin: float = 0.0):
        if not 0 <= margin <= 1:
            raise ConfigError(f"--face-margin {margin}: a fraction of the face's size in [0, 1], e.g. 0.2")
        self.mtcnn = mtcnn_class()(keep_all=False, device=device)
        self.margin = margin

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Face | None]:
        """The image cut to its most confident face, and that face; the image whole and None without one."""
        from PIL import Image

        boxes, probs = self.mtcnn.detect(Image.fromarray(image))
        if boxes is None:
            return image, None
        best = int(np.argmax(probs))
        x0, y0, x1, y1 = boxes[best]
        dx, dy = self.margin * (x1 - x0), self.margin * (y1 - y0)
        h, w = image.shape[:2]
        box = (max(0, round(x0 - dx)), max(0, round(y0 - dy)), min(w, round(x1 + dx)), min(h, round(y1 + dy)))
        if box[2] <= box[0] or box[3] <= box[1]:  # a box outside the image: no face to crop
            return image, None
        return image[box[1]:box[3], box[0]:box[2]], Face(box, float(probs[best]))

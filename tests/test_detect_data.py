"""slaknet.detect on the user's own COCO files: data named by file, --recipe auto / --detector auto read the
annotations, one input-size knob, bad labels found before training, labelled prediction pictures, summary.json.
The data are written by the tests (a boxes-only COCO JSON with out-of-image and degenerate boxes, files outside
the annotations/ layout); runs are tiny (slak_pico, a few 40 x 60 images, small heads)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _label_text(arr):
    """Pixels of white text on a red tag (anti-aliased: (255, v, v), v >= 128): no image here has them."""
    r, g, b = (arr[..., i].astype(int) for i in range(3))
    return (r == 255) & (g == b) & (g >= 128)


# ---------------------------------------------------------------------------------------------- drawing ----
def test_prediction_pictures_carry_names_and_scores():
    from slaknet.detect.inference import draw_detections

    img = torch.zeros(3, 48, 64)
    rec = {"boxes": [[4.0, 4.0, 60.0, 44.0]], "scores": [0.87], "names": ["dog"]}
    drawn = draw_detections(img, rec)
    plain = draw_detections(img, rec, labels=False)
    assert drawn.shape == (3, 48, 64) and drawn.dtype == torch.uint8
    text = (drawn != plain).any(0)
    assert text[4:20, 4:50].sum() > 20  # the label "dog 0.87" at the box's top-left corner
    assert _label_text(drawn.permute(1, 2, 0).numpy()).sum() > 10

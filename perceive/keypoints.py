"""COCO's person keypoints: the 17 points in their order and the 19 limbs between them (1-based, as in
COCO's annotations). The world draws its persons' skeletons by them; answers carry and draw keypoints in
this order."""

from __future__ import annotations

# COCO's person keypoints (the public person_keypoints definition), in their order.
COCO_PERSON_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# COCO's person skeleton: 19 limbs, 1-based indices into COCO_PERSON_KEYPOINTS (as in the annotations).
COCO_PERSON_SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
)

"""The field's metrics, each one documented function, and ``perceive eval``.

- ``detection``: COCO AP (pycocotools), LVIS AP by frequency (faster-coco-eval), ChatRex P@0.5/R@0.5
- ``referring``: RefCOCO accuracy, HumanRef recall / precision / density-F1, cIoU and gIoU
- ``panoptic``: PQ / SQ / RQ (things and stuff), semantic mIoU
- ``text``: Osprey's SS and S-IoU, REF-VLM's mAP_S, CIDEr-D

All values are fractions in [0, 1] (papers print them x100).
"""

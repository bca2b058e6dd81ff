"""Configuration of the universal proposal network (UPN, ChatRex Sec. 3.1)."""

from __future__ import annotations

from transformers import PretrainedConfig

GRANULARITIES = ("coarse", "fine")


class UpnConfig(PretrainedConfig):
    """The universal proposal network's configuration (ChatRex Sec. 3.1): class-agnostic boxes at two
    granularities, coarse (instances) and fine (parts). The defaults are the paper's behaviour where it
    has one (no cross-granularity suppression, no refinement). What each option measured:
    ``docs/experiments/upn.md``.

    Args:
        image_size: the square input size in pixels (images are padded to a square, then resized).
        hidden_sizes, depths: the ConvNeXt backbone's stage widths and depths.
        head_dim: width of the dense head's embedding and of the two granularity prompts.
        max_proposals: the most boxes kept per image (100, the number of ``<objK>`` tokens).
        pre_nms_topk: score-map peaks considered per granularity before suppression.
        nms_iou: the IoU above which non-maximum suppression (per granularity) drops the weaker box.
        min_score: proposals scoring under this are dropped.
        cross_granularity_iou: if set, also drop a box whose IoU with a better box of the other
            granularity is above it (one object, one box); None keeps the paper's two independent sets.
        box_refinement: a second stage refines every candidate box before suppression (RoI Align over the
            stride-4 features and the pixels, then an MLP), trained after the first stage on its features.
        refine_grid: the refinement's RoI grid over the features, cells a side (the pixels get twice as many).
        refine_context: the refinement's window, as a multiple of the box.
    """

    model_type = "perceive_upn"

    def __init__(
        self,
        image_size: int = 256,
        hidden_sizes: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 1),
        head_dim: int = 64,
        max_proposals: int = 100,
        pre_nms_topk: int = 200,
        nms_iou: float = 0.6,
        min_score: float = 0.01,
        cross_granularity_iou: float | None = None,
        box_refinement: bool = False,
        refine_grid: int = 7,
        refine_context: float = 1.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.hidden_sizes = list(hidden_sizes)
        self.depths = list(depths)
        self.head_dim = head_dim
        self.max_proposals = max_proposals
        self.pre_nms_topk = pre_nms_topk
        self.nms_iou = nms_iou
        self.min_score = min_score
        if cross_granularity_iou is not None and not 0.0 < cross_granularity_iou <= 1.0:
            raise ValueError(f"cross_granularity_iou must be in (0, 1] or None, got {cross_granularity_iou}")
        self.cross_granularity_iou = cross_granularity_iou
        if refine_grid < 1 or refine_context < 1.0:
            raise ValueError(f"refine_grid must be >= 1 and refine_context >= 1, got {refine_grid}, {refine_context}")
        self.box_refinement = box_refinement
        self.refine_grid = refine_grid
        self.refine_context = refine_context

    @property
    def stride(self) -> int:
        return 4

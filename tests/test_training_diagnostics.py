"""The 2D training diagnostics: positive shares of the RPN and RoI samples, and the RPN's proposal recall."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from models.mask_net.mask_rcnn import maskrcnn_resnet_fpn
from models.mask_net.workflows.loops import proposal_recall, train_one_epoch, validation_detection_metrics

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return maskrcnn_resnet_fpn(backbone_name="resnet18", truncation=2, num_classes=2, min_size=64, max_size=128,
                               fpn_channels=16)


def test_rpn_records_its_positive_and_sampled_anchors(model):
    # IoU with GT: 1.0 (pos), 0.9 (pos), 0 (neg), 0.5 (between 0.3 and 0.7: ignored), 0 (neg)
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 20], [50, 50, 60, 60.0]])
    assert box_iou(GT, anchors)[0].tolist() == pytest.approx([1.0, 0.9, 0.0, 0.5, 0.0])
    model.rpn.loss(anchors, torch.zeros(1, 5), torch.zeros(1, 5, 4), [{"boxes": GT}])
    assert model.rpn.last_sampling == (2, 4)


def test_roi_heads_record_their_positive_and_sampled_rois(model):
    # IoU with GT: 1.0 (pos), 0.625 (between 0.5 and 0.75: ignored), 0 (neg); the GT box is added (pos)
    proposals = [torch.tensor([[0, 0, 10, 10], [0, 0, 10, 16], [30, 30, 40, 40.0]])]
    model.roi_heads.sample_rois(proposals, [{"boxes": GT, "labels": torch.tensor([1])}])
    assert model.roi_heads.last_sampling == (2, 3)


class _Stage(torch.nn.Module):
    last_sampling = None


class _Recorder(torch.nn.Module):
    """Stands in for a Mask R-CNN: each step its stages report the given (positive, sampled) counts."""

    def __init__(self, rpn_counts, roi_counts):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.rpn, self.roi_heads = _Stage(), _Stage()
        self.counts = iter(zip(rpn_counts, roi_counts))

    def forward(self, images, targets):
        self.rpn.last_sampling, self.roi_heads.last_sampling = next(self.counts)
        return {"loss": self.weight * 1.0}


def test_train_one_epoch_reports_the_positive_share_over_the_epoch():
    model = _Recorder([(2, 4), (1, 4)], [(1, 10), (0, 10)])
    loader = [([torch.zeros(3, 8, 8)], [{}])] * 2
    out = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), device=torch.device("cpu"),
                          epoch=0, progress=False)
    assert out["rpn_pos_fraction"] == pytest.approx(3 / 8)
    assert out["roi_pos_fraction"] == pytest.approx(1 / 20)


def test_proposal_recall_counts_ground_truth_boxes_covered_at_each_iou():
    gt = [torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60.0]]), torch.zeros(0, 4)]
    proposals = [torch.tensor([[0, 0, 10, 10], [20, 20, 40, 34], [0, 0, 5, 5.0]]), torch.tensor([[0, 0, 4, 4.0]])]
    best = box_iou(gt[0], proposals[0]).max(dim=1).values
    assert best.tolist() == pytest.approx([1.0, 0.7, 0.0])
    assert proposal_recall(proposals, gt) == {0.5: (2, 3), 0.75: (1, 3)}
    assert proposal_recall([torch.zeros(0, 4)], gt[:1]) == {0.5: (0, 3), 0.75: (0, 3)}


def test_validation_metrics_use_the_eval_mode_proposals_in_input_pixels(model):
    torch.manual_seed(1)
    images = [torch.rand(3, 32, 48), torch.rand(3, 32, 48)]
    masks = torch.zeros(1, 32, 48, dtype=torch.uint8)
    masks[0, 4:20, 8:30] = 1
    target = {"boxes": torch.tensor([[8.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1]), "masks": masks}
    model.train()
    out = validation_detection_metrics(model, [(images, [target, target])], device=torch.device("cpu"),
                                       progress=False)
    assert model.training, "the model's mode is restored"
    # the hand count: eval-mode proposals (resized image pixels) scaled back to the input's 32 x 48
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform(images)
        proposals, _ = model.rpn(batch, model.backbone(batch.tensors))
    model.train()
    scale = torch.tensor([48 / batch.image_sizes[0][1], 32 / batch.image_sizes[0][0]] * 2)
    best = torch.stack([box_iou(target["boxes"], p * scale).max() for p in proposals])
    assert out["rpn_recall50"] == pytest.approx(float((best >= 0.5).float().mean()))
    assert out["rpn_recall75"] == pytest.approx(float((best >= 0.75).float().mean()))
    assert 0.0 <= out["segm_AP50"] <= 1.0 and 0.0 <= out["segm_mAP"] <= 1.0 or math.isnan(out["segm_mAP"])

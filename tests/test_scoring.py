import math

import pytest
import torch

from curate.score import metrics as scoring


def test_example_scores_match_hand_computed_values():
    # probs for row 0: softmax([0, ln 2, ln 5]) = [1/8, 2/8, 5/8]
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]])
    s = scoring.example_scores(logits, torch.tensor([1]))
    p = torch.tensor([1 / 8, 2 / 8, 5 / 8])
    assert s["loss"].item() == pytest.approx(-math.log(2 / 8), abs=1e-6)
    assert s["margin"].item() == pytest.approx(2 / 8 - 5 / 8, abs=1e-6)
    assert s["el2n"].item() == pytest.approx(math.sqrt((1 / 8) ** 2 + (6 / 8) ** 2 + (5 / 8) ** 2), abs=1e-6)
    assert s["entropy"].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    assert s["pred"].item() == 2
    assert s["confidence"].item() == pytest.approx(5 / 8, abs=1e-6)


def test_example_scores_correct_label_has_positive_margin_and_unknown_label_is_nan():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    s = scoring.example_scores(logits, torch.tensor([0, -1]))
    assert s["margin"][0] > 0.9 and s["el2n"][0] < 0.01
    assert all(math.isnan(s[k][1].item()) for k in ("loss", "margin", "el2n"))
    assert not math.isnan(s["entropy"][1].item())


def test_forgetting_counts_transitions_and_never_learned_is_max():
    correct = torch.tensor([
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [1, 0, 1, 0],
        [0, 0, 1, 1],
    ], dtype=torch.bool)  # (E=4, N=4)
    # col 0: 1->0 at 0->1 and 2->3: 2 events; col 1 never correct: E; col 2 always: 0; col 3: 1->0 once
    assert scoring.forgetting_counts(correct).tolist() == [2, 4, 0, 1]


def test_rollout_of_identity_attention_is_uniform_over_the_cls_row():
    eye = torch.eye(5).expand(1, 2, 5, 5)
    # identity attention + residual keeps CLS on itself: no patch gets any weight
    assert scoring.attention_rollout([eye, eye], num_prefix=1).abs().max() == 0
    uniform = torch.full((1, 2, 5, 5), 0.2)
    out = scoring.attention_rollout([uniform], num_prefix=1)
    torch.testing.assert_close(out, torch.full((1, 4), 0.1))  # (0.2 + 0) / 2 per patch


def test_to_grid_is_row_major_float16_summing_to_one():
    grid = scoring.to_grid(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 5.0]]), (2, 3))
    assert grid.dtype == torch.float16 and grid.shape == (1, 2, 3)
    assert grid[0, 1, 0].item() == pytest.approx(4 / 20, abs=1e-3)
    assert grid.float().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_roc_auc_perfect_random_and_ties():
    pos = torch.tensor([True, True, False, False])
    assert scoring.roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), pos) == 1.0
    assert scoring.roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), pos) == 0.0
    assert scoring.roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), pos) == 0.5
    # one positive above both negatives, one tied with a negative: (1 + 1 + 1 + 0.5) / 4
    assert scoring.roc_auc(torch.tensor([0.9, 0.3, 0.3, 0.1]), pos) == pytest.approx(0.875)
    with pytest.raises(ValueError):
        scoring.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))

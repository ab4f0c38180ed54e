import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dcfeat.heads import AAMC, HEAD_CLASSES, LMCC, GroupHeads, Projection, SoftmaxHead


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def head_at(kind: type, angles: list[float], s: float = 10.0, m: float = 0.5):
    """A 2-D head whose prototypes point at the given angles."""
    head = kind(2, len(angles), s, m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a) for a in angles]))
    return head


def test_aamc_logits_by_hand():
    head = head_at(AAMC, [0.0, 90.0])
    h = torch.tensor([unit(60.0), unit(60.0)])
    with_margin = head(h, torch.tensor([0, 1]))
    expected = [
        [10 * math.cos(math.radians(60) + 0.5), 10 * math.cos(math.radians(30))],
        [10 * math.cos(math.radians(60)), 10 * math.cos(math.radians(30) + 0.5)],
    ]
    torch.testing.assert_close(with_margin, torch.tensor(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(head(h), 10 * torch.tensor([[0.5, math.sqrt(3) / 2]] * 2), rtol=0, atol=1e-5)


def test_aamc_past_pi_minus_m_keeps_falling():
    head = head_at(AAMC, [0.0], s=1.0, m=0.5)
    h = torch.tensor([unit(170.0)])  # θ + m > π
    expected = math.cos(math.radians(170)) - 0.5 * math.sin(0.5)
    assert head(h, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)


def test_lmcc_logits_by_hand():
    head = head_at(LMCC, [0.0, 90.0], s=30.0, m=0.4)
    logits = head(torch.tensor([unit(60.0)]), torch.tensor([1]))
    torch.testing.assert_close(logits, torch.tensor([[15.0, 30 * (math.sqrt(3) / 2 - 0.4)]]), rtol=0, atol=1e-5)


def test_softmax_head_is_linear_and_ignores_labels():
    head = SoftmaxHead(2, 3)
    h = torch.randn(4, 2)
    torch.testing.assert_close(head(h), h @ head.weight.T + head.bias)
    torch.testing.assert_close(head(h, torch.tensor([0, 1, 2, 0])), head(h))


@pytest.mark.parametrize("kind", [AAMC, LMCC])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_logits_and_gradients_at_cos_plus_minus_one(kind, sign):
    head = kind(4, 3, 30.0, 0.5)
    h = (sign * head.weight.detach()[:1].clone()).requires_grad_(True)  # cos θ_0 = ±1 exactly
    loss = F.cross_entropy(head(h, torch.tensor([0])), torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(h.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("kind", [AAMC, LMCC])
def test_bf16_autocast_stays_finite_and_close_to_fp32(kind):
    torch.manual_seed(0)
    projection, head = Projection(16, 8), kind(8, 5, 30.0, 0.5)
    features, labels = torch.randn(32, 16), torch.randint(0, 5, (32,))
    reference = head(projection(features), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(projection(features), labels)
    # Training logits stay in bf16 (no float32 copy of batch × classes); targets are
    # computed in float32 and rounded once.
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; s = 30 scales that.
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.3)
    target = labels.unsqueeze(1)
    torch.testing.assert_close(logits.float().gather(1, target), reference.gather(1, target), rtol=0, atol=0.13)


def test_projection_is_unit_norm_and_safe_at_zero():
    projection = Projection(6, 4)
    h = projection(torch.randn(5, 6, dtype=torch.float16))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        projection.linear.weight.zero_()
        projection.linear.bias.zero_()
    assert torch.isfinite(projection(torch.randn(2, 6))).all()


def test_repr_shows_classes_dim_s_m():
    assert "classes=7, dim=3, s=30, m=0.4" in repr(AAMC(3, 7, 30.0, 0.4))
    assert "classes=7, dim=3" in repr(SoftmaxHead(3, 7))


@pytest.mark.parametrize("name", sorted(HEAD_CLASSES))
def test_group_scores_concatenate_groups_in_order(name):
    torch.manual_seed(1)
    heads = GroupHeads([3, 0, 2, 4], head=name, dim=5, s=30.0, m=0.4)
    assert heads.offsets == [0, 3, 3, 5, 9]
    assert list(heads.keys()) == ["0", "1", "2", "3"]
    h = F.normalize(torch.randn(6, 5), dim=1)
    scores = heads.scores(h)
    assert scores.shape == (6, 9)
    for g in range(4):
        head = heads[str(g)]
        block = scores[:, heads.offsets[g] : heads.offsets[g + 1]]
        if name == "softmax":
            expected = torch.log_softmax(h @ head.weight.T + head.bias, dim=1)
        else:
            expected = h @ F.normalize(head.weight, dim=1).T
        torch.testing.assert_close(block, expected)


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match=r"\['aamc', 'lmcc', 'softmax'\]"):
        GroupHeads([2], head="arcface", dim=4, s=30.0, m=0.4)


def test_init_prototypes_copies_normalised_means():
    heads = GroupHeads([2, 3], head="aamc", dim=2, s=30.0, m=0.4)
    heads.init_prototypes_(1, torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]]))
    torch.testing.assert_close(heads["1"].weight.data, torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="group 0"):
        heads.init_prototypes_(0, torch.zeros(3, 2))


def test_group_heads_state_dict_round_trips_through_safetensors(tmp_path):
    heads = GroupHeads([2, 1, 3, 2], head="lmcc", dim=4, s=30.0, m=0.4)
    state = heads.state_dict()
    assert sorted(state) == ["0.weight", "1.weight", "2.weight", "3.weight"]
    save_file(state, tmp_path / "heads.safetensors")
    fresh = GroupHeads([2, 1, 3, 2], head="lmcc", dim=4, s=30.0, m=0.4)
    fresh.load_state_dict(load_file(tmp_path / "heads.safetensors"))
    h = F.normalize(torch.randn(3, 4), dim=1)
    torch.testing.assert_close(fresh.scores(h), heads.scores(h), rtol=0, atol=0)

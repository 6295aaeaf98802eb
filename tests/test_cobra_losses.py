"""CoBra losses (docs/methods/cobra.md "Losses") against literal per-element loop oracles written
from the spec."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_core.methods.cobra_losses import (cap_loss, cnn_pseudo_labels, l1_intercam,
                                            l1_positive_term, multilabel_soft_margin, sap_loss)

B, C, H, W, D = 2, 20, 14, 14, 256
P = H * W


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_cnn = torch.randn(B, C + 1, H, W, generator=g)
    labels = (torch.rand(B, C, generator=g) < 0.15).float()
    labels[:, 3] = 1.0  # at least one present class per image
    e_vit = torch.randn(B, D, H, W, generator=g)
    e_cnn = torch.randn(B, D, H, W, generator=g)
    attn = torch.rand(B, 12, P + 1, P + 1, generator=g).softmax(dim=-1)
    return z_cnn, labels, e_vit, e_cnn, attn


# ---------------------------------------------------------------- literal oracles ---------

def _argmax_first(values: list[float]) -> int:
    best = max(values)
    return next(i for i, v in enumerate(values) if v == best)


def oracle_pseudo_labels(z_cnn: torch.Tensor, labels: torch.Tensor, mode: str) -> np.ndarray:
    z = z_cnn.double().numpy().reshape(z_cnn.shape[0], z_cnn.shape[1], -1)
    y = labels.numpy()
    out = np.zeros((z.shape[0], z.shape[2]), dtype=np.int64)
    for b in range(z.shape[0]):
        m = [1.0] + list(y[b])
        for p in range(z.shape[2]):
            if mode == "official":
                vals = [z[b, c, p] * m[c] for c in range(z.shape[1])]
            else:
                vals = [z[b, c, p] if m[c] else -math.inf for c in range(z.shape[1])]
            out[b, p] = _argmax_first(vals)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.sqrt((v * v).sum())), 1e-12)


def oracle_contrastive(e: torch.Tensor, pos_sets, neg_sets, tau: float, bug: bool) -> float:
    """L = 1/(B P K⁺) Σ_b Σ_p Σ_{q∈Pos} -log(exp(s_pq/τ) / (exp(s_pq/τ) + N_p))."""
    e = e.double().numpy().reshape(e.shape[0], e.shape[1], -1)
    total, count = 0.0, 0
    for b in range(e.shape[0]):
        vec = [_unit(e[b, :, q]) for q in range(e.shape[2])]
        for p in range(e.shape[2]):
            if bug:  # (1/τ)·Σ exp(s_pn)
                neg = sum(math.exp(float(vec[p] @ vec[n])) for n in neg_sets[b][p]) / tau
            else:
                neg = sum(math.exp(float(vec[p] @ vec[n]) / tau) for n in neg_sets[b][p])
            for q in pos_sets[b][p]:
                pos = math.exp(float(vec[p] @ vec[q]) / tau)
                total += -math.log(pos / (pos + neg))
                count += 1
    return total / count


def _top(row: np.ndarray, k: int, largest: bool) -> list[int]:
    order = sorted(range(len(row)), key=lambda q: -row[q] if largest else row[q])
    return order[:k]


def oracle_sap(z_cnn, pseudo, e_vit, k_pos, k_neg, tau, bug) -> float:
    z = z_cnn.double().numpy().reshape(z_cnn.shape[0], z_cnn.shape[1], -1)
    pos_sets, neg_sets = [], []
    for b in range(z.shape[0]):
        pos_b, neg_b = [], []
        for p in range(z.shape[2]):
            row = z[b, int(pseudo[b, p])]  # CNN map of p's pseudo class over all positions
            pos_b.append(_top(row, k_pos, True))
            neg_b.append(_top(row, k_neg, False))
        pos_sets.append(pos_b)
        neg_sets.append(neg_b)
    return oracle_contrastive(e_vit, pos_sets, neg_sets, tau, bug)


def oracle_cap(attn, e_cnn, k_pos, k_neg, tau) -> float:
    a = attn.double().numpy()
    pos_sets, neg_sets = [], []
    for b in range(a.shape[0]):
        aff = sum(a[b, l] for l in range(a.shape[1]))[1:, 1:]
        pos_sets.append([_top(aff[p], k_pos, True) for p in range(aff.shape[0])])
        neg_sets.append([_top(aff[p], k_neg, False) for p in range(aff.shape[0])])
    return oracle_contrastive(e_cnn, pos_sets, neg_sets, tau, False)


# ---------------------------------------------------------------- stable form ----------

@pytest.mark.parametrize("bug", [True, False])
def test_sap_matches_loop_oracle(bug: bool) -> None:
    z_cnn, labels, e_vit, _, _ = _inputs(1)
    pseudo = cnn_pseudo_labels(z_cnn, labels, "official")
    got = sap_loss(z_cnn, pseudo, e_vit, k_pos=20, k_neg=5, tau=0.1, temperature_bug=bug)
    want = oracle_sap(z_cnn, pseudo, e_vit, 20, 5, 0.1, bug)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cap_matches_loop_oracle() -> None:
    _, _, _, e_cnn, attn = _inputs(2)
    got = cap_loss(attn, e_cnn, k_pos=5, k_neg=20, tau=0.1)
    want = oracle_cap(attn, e_cnn, 5, 20, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_sap_official_and_fix_differ_and_coincide_at_tau_one() -> None:
    z_cnn, labels, e_vit, _, _ = _inputs(3)
    pseudo = cnn_pseudo_labels(z_cnn, labels, "neginf")
    official = sap_loss(z_cnn, pseudo, e_vit, 20, 5, 0.1, temperature_bug=True)
    fixed = sap_loss(z_cnn, pseudo, e_vit, 20, 5, 0.1, temperature_bug=False)
    assert abs(official.item() - fixed.item()) > 1e-2
    official1 = sap_loss(z_cnn, pseudo, e_vit, 20, 5, 1.0, temperature_bug=True)
    fixed1 = sap_loss(z_cnn, pseudo, e_vit, 20, 5, 1.0, temperature_bug=False)
    assert official1.item() == pytest.approx(fixed1.item(), rel=1e-6)


def test_no_gradient_to_cnn_logits_from_sap_nor_attention_from_cap() -> None:
    z_cnn, labels, e_vit, e_cnn, attn = _inputs(4)
    z_cnn.requires_grad_(True)
    attn.requires_grad_(True)
    e_vit.requires_grad_(True)
    e_cnn.requires_grad_(True)
    pseudo = cnn_pseudo_labels(z_cnn, labels)
    (sap_loss(z_cnn, pseudo, e_vit, 20, 5, 0.1) + cap_loss(attn, e_cnn, 5, 20, 0.1)).backward()
    assert z_cnn.grad is None and attn.grad is None
    assert e_vit.grad is not None and e_vit.grad.abs().sum() > 0
    assert e_cnn.grad is not None and e_cnn.grad.abs().sum() > 0


def test_invariant_to_embedding_scale_and_layer_sum_vs_mean() -> None:
    z_cnn, labels, e_vit, e_cnn, attn = _inputs(5)
    pseudo = cnn_pseudo_labels(z_cnn, labels)
    scale = torch.rand(B, 1, H, W) * 10 + 0.1  # per-position positive scale
    for bug in (True, False):
        a = sap_loss(z_cnn, pseudo, e_vit, 20, 5, 0.1, bug)
        b = sap_loss(z_cnn, pseudo, e_vit * scale, 20, 5, 0.1, bug)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    a = cap_loss(attn, e_cnn, 5, 20, 0.1)
    assert cap_loss(attn, e_cnn * scale, 5, 20, 0.1).item() == pytest.approx(a.item(), rel=1e-5)
    # averaging over layers = summing attention scaled by 1/L: same ranking, same loss
    layer_mean = attn / attn.shape[1]
    assert cap_loss(layer_mean, e_cnn, 5, 20, 0.1).item() == pytest.approx(a.item(), rel=1e-6)


def test_sap_official_bug_value_by_hand() -> None:
    """Tiny case by hand: 1 image, 3 positions on a 1x3 grid, 2-d embeddings, K⁺ = K⁻ = 1."""
    z = torch.tensor([[[[0.0, 0.0, 0.0]], [[3.0, 2.0, 1.0]]]])  # bg, class 1; [1, 2, 1, 3]
    pseudo = torch.tensor([[1, 1, 1]])  # Pos = {0}, Neg = {2} for every query
    e = torch.tensor([[[[1.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]]])  # unit vectors: s_00=1, s_02=-1 ...
    tau = 0.5
    s = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])  # (s_p0, s_p2) per query p
    fixed = torch.log1p(torch.exp(s[:, 1] / tau) / torch.exp(s[:, 0] / tau)).mean()
    buggy = torch.log1p((torch.exp(s[:, 1]) / tau) / torch.exp(s[:, 0] / tau)).mean()
    assert sap_loss(z, pseudo, e, 1, 1, tau, False).item() == pytest.approx(fixed.item(), rel=1e-6)
    assert sap_loss(z, pseudo, e, 1, 1, tau, True).item() == pytest.approx(buggy.item(), rel=1e-6)


# ---------------------------------------------------------------- pseudo labels ---

def test_pseudo_labels_match_oracle_both_modes() -> None:
    z_cnn, labels, *_ = _inputs(6)
    for mode in ("official", "neginf"):
        got = cnn_pseudo_labels(z_cnn, labels, mode).numpy()
        np.testing.assert_array_equal(got, oracle_pseudo_labels(z_cnn, labels, mode))


def test_pseudo_labels_official_zero_logit_absent_class_can_win() -> None:
    labels = torch.zeros(1, 4)
    labels[0, 2] = 1.0  # class index 2 present → channel 3; channels 1, 2, 4 absent
    z = torch.tensor([-1.0, 5.0, 7.0, -0.5, 9.0]).reshape(1, 5, 1, 1).repeat(1, 1, 1, 2)
    z[0, :, 0, 1] = torch.tensor([-2.0, -3.0, -4.0, 0.5, -1.0])  # present class positive
    official = cnn_pseudo_labels(z, labels, "official")
    neginf = cnn_pseudo_labels(z, labels, "neginf")
    # p0: bg -1 and present -0.5 lose to the zeroed absent channels; first of them (1) wins
    assert official.tolist() == [[1, 3]]
    assert neginf.tolist() == [[3, 3]]
    assert set(neginf.unique().tolist()) <= {0, 3}


# ---------------------------------------------------------------- classification and L1

def test_multilabel_soft_margin_per_element_formula() -> None:
    z_cnn, labels, *_ = _inputs(7)
    g = z_cnn.double().numpy().reshape(B, C + 1, -1).mean(axis=2)[:, 1:]
    y = labels.numpy()
    total = 0.0
    for b in range(B):
        for k in range(C):
            sig = 1.0 / (1.0 + math.exp(-g[b, k]))
            total += -(y[b, k] * math.log(sig) + (1 - y[b, k]) * math.log(1 - sig))
    want = total / (B * C)
    assert multilabel_soft_margin(z_cnn, labels).item() == pytest.approx(want, rel=1e-5)
    # without background channel the map is used whole
    assert multilabel_soft_margin(z_cnn[:, 1:], labels).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        multilabel_soft_margin(z_cnn[:, 2:], labels)


def test_background_channel_gets_no_gradient_from_msm() -> None:
    z_cnn, labels, *_ = _inputs(8)
    z_cnn.requires_grad_(True)
    multilabel_soft_margin(z_cnn, labels).backward()
    assert z_cnn.grad[:, 0].abs().max() == 0 and z_cnn.grad[:, 1:].abs().max() > 0


def _bilinear_align_corners(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Literal bilinear resize of [h, w] with corner pixels aligned."""
    h, w = m.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def test_l1_terms_match_loop() -> None:
    g = torch.Generator().manual_seed(9)
    n_cls = 3
    z_c = torch.randn(2, n_cls + 1, 4, 5, generator=g)
    z_v = torch.randn(2, n_cls + 1, 3, 4, generator=g)  # grids may differ (ceil vs floor)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = (9, 11)
    diffs = np.zeros((2, n_cls + 1))
    for b in range(2):
        for c in range(n_cls + 1):
            d = (_bilinear_align_corners(z_c[b, c].double().numpy(), *out)
                 - _bilinear_align_corners(z_v[b, c].double().numpy(), *out))
            diffs[b, c] = np.abs(d).mean()
    assert l1_intercam(z_c, z_v, out).item() == pytest.approx(diffs.mean(), rel=1e-5)
    per_image = [np.mean([diffs[b, 1 + k] for k in range(n_cls) if labels[b, k]]) for b in range(2)]
    assert l1_positive_term(z_c, z_v, labels, out).item() == pytest.approx(np.mean(per_image),
                                                                           rel=1e-5)
    assert l1_intercam(z_c, z_c, 7).item() == 0.0


def test_contrastive_gradient_is_exact_and_finite_at_zero_vector() -> None:
    """The symmetric Gram backward against finite differences (float64), and a zero embedding
    vector (norm clamped at 1e-12) gives finite gradients."""
    g = torch.Generator().manual_seed(10)
    z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    pseudo = cnn_pseudo_labels(z, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
                                               dtype=torch.float64))
    e = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    attn = torch.rand(2, 2, 10, 10, generator=g, dtype=torch.float64)
    for bug in (True, False):
        assert torch.autograd.gradcheck(lambda x: sap_loss(z, pseudo, x, 3, 2, 0.5, bug), (e,))
    assert torch.autograd.gradcheck(lambda x: cap_loss(attn, x, 2, 3, 0.5), (e,))
    e0 = e.detach().clone()
    e0[0, :, 1, 1] = 0.0
    e0.requires_grad_(True)
    loss = sap_loss(z, pseudo, e0, 3, 2, 0.5) + cap_loss(attn, e0, 2, 3, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e0.grad).all()


@pytest.mark.parametrize("loss", ["sap", "cap"])
def test_contrastive_losses_hold_their_fp32_value_under_bf16_autocast(loss: str) -> None:
    """Similarity, log-sum-exp and normalisation run in fp32 inside any autocast region
    (wsss_core/precision.py): the value and the gradient under CPU bf16 autocast equal the fp32
    ones to relative 1e-3 (bf16 keeps 8 bits: a bf16 Gram matrix is off by ~1e-2)."""
    z_cnn, labels, e_vit, e_cnn, attn = _inputs(5)

    def run():
        e = (e_vit if loss == "sap" else e_cnn).clone().requires_grad_(True)
        if loss == "sap":
            value = sap_loss(z_cnn, cnn_pseudo_labels(z_cnn, labels), e, 20, 5, 0.1, True)
        else:
            value = cap_loss(attn, e, 5, 20, 0.1)
        value.backward()
        return value.detach(), e.grad

    ref, ref_grad = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_grad = run()
    assert low.dtype == torch.float32
    assert abs(float(low) - float(ref)) <= 1e-3 * abs(float(ref))
    assert float((low_grad - ref_grad).norm()) <= 1e-3 * float(ref_grad.norm())

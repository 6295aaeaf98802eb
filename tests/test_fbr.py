"""FBR (docs/methods/fbr.md): per-element loop oracles for TAP, prototypes, the query set, the
FB and IF losses and K-means; the spec's testable invariants; the paper preset on CPU; the
NROI bank through a checkpoint."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare, kstest

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.engine import load_checkpoint, save_checkpoint
from wsss_core.methods import StepContext, create_method
from wsss_core.errors import ConfigError
from wsss_core.methods.fbr import FBRMethod
from wsss_core.methods.fbr_losses import (_SampledCosine, sample_bank_negatives, sorted_uniforms, NROIBank, active_class_distribution, background_target,
                                   batched_kmeans, cap_queries, class_prototypes,
                                   decorrelation_loss, fb_loss, host_pseudo_labels, if_loss,
                                   image_nrois, key_similarities, query_mask,
                                   sample_if_negatives)
from wsss_core.models.fbr_net import FBRNet, thresholded_avg_pool
from wsss_core.models.resnet_cam import ResNetCAM
from wsss_core.stages.export_cams import image_maps

CPU = torch.device("cpu")
#: a from-scratch stand-in for the steps (the FBR terms do not depend on the backbone; the tiny
#: preset's Lite0 stages are checked in test_fbr_net_heads_logits_and_unchanged_cam)
TINY = {"backbone": "resnet_tiny", "strides": [2, 2, 1, 1], "pretrained": False,
        "frozen_bn": False, "detach_early": False}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scene(seed: int = 0, B: int = 3, C: int = 5, h: int = 9, w: int = 11, d: int = 6):
    """A CAM with 2 present classes per image, its pseudo labels, and random features."""
    g = _gen(seed)
    labels = torch.zeros(B, C)
    for b in range(B):
        labels[b, torch.randperm(C, generator=g)[:2]] = 1
    cam = torch.randn(B, C, h, w, generator=g) * 2
    f = torch.rand(B, d, h, w, generator=g)
    scores, probs, pseudo = host_pseudo_labels(cam, labels, 0.10)
    return cam, labels, f, scores, probs, pseudo


def _cos(a, b, eps=1e-8):
    return float(a @ b) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))


def _tiny_method(**fbr) -> object:
    params = {"plugin": "fbr", "model": dict(TINY),
              "fbr": dict(dict(proj_dim=8, nroi_k=3, bank_capacity=64, n_neg=8), **fbr)}
    return create_method(params, 4, train_params={"seed": 0})


# ------------------------------------------------------------------------------ TAP

def test_tap_matches_loop_oracle_and_invariants():
    g = _gen(1)
    f = F.relu(torch.randn(2, 4, 5, 6, generator=g))
    f[1, 2] = 0  # an all-zero channel
    theta = 0.3
    got = thresholded_avg_pool(f, theta)
    for b in range(2):
        for k in range(4):
            vals = f[b, k].flatten().tolist()
            m = max(vals)
            kept = [v for v in vals if v > theta * m]
            want = sum(kept) / max(1, len(kept))
            assert got[b, k].item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert got[1, 2] == 0
    gap = f.mean(dim=(2, 3))
    assert (got >= gap - 1e-6).all()
    pos = torch.rand(2, 4, 5, 6, generator=g) + 0.1
    torch.testing.assert_close(thresholded_avg_pool(pos, 0.0), pos.mean(dim=(2, 3)))


@pytest.mark.parametrize("backbone, strides, frozen", [("resnet_tiny", (2, 2, 1, 1), False),
                                                       ("tf_efficientnet_lite0", (2, 2, 2, 1), True)])
def test_fbr_net_heads_logits_and_unchanged_cam(backbone, strides, frozen, repo_root):
    """The heads read the final feature map whatever its width (ResNet stages or the Lite0
    stages' 1280-channel head conv, the tiny preset's backbone) and leave the inference CAM
    untouched; the head gradients reach layer4 and, with `detach_early`, never the stem."""
    if backbone != TINY["backbone"]:
        tiny = method_params(load_config(repo_root / "config.yaml"), "toy", "fbr")["model"]
        assert (tiny["backbone"], tuple(tiny["strides"]), tiny["frozen_bn"], tiny["detach_early"],
                tiny["pretrained"]) == (backbone, strides, frozen, frozen, True)
    torch.manual_seed(0)
    kw = dict(strides=strides, detach_early=frozen, frozen_bn=frozen)
    net = FBRNet(backbone, 3, proj_dim=16, tap_threshold=0.1, **kw)
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    out = net(x)
    feat = net.features(x)
    side = 64 // net.output_stride
    assert net.fg_proj.in_channels == net.bg_proj.in_channels == feat.shape[1] == net.backbone.out_channels[-1]
    assert out["fg"].shape == out["bg_pre"].shape == (2, 16, side, side)
    assert (out["fg"] >= 0).all() and (out["bg_post"] >= 0).all()
    assert net.fg_proj.bias is None and net.bg_proj.bias is None and net.bg_cls.bias is None
    torch.testing.assert_close(out["logits"], thresholded_avg_pool(feat, 0.1) @ net.classifier.weight.flatten(1).t())
    plain = ResNetCAM(backbone, 3, **kw)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith(("backbone.", "classifier."))})
    plain.eval()
    torch.testing.assert_close(net.cam(x), plain.cam(x))
    torch.testing.assert_close(out["cam"], plain(x)["logits"])
    (out["fg"].sum() + out["bg_logit"].sum()).backward()
    assert net.fg_proj.weight.grad.abs().sum() > 0 and net.bg_cls.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.layer4.parameters())
    assert (next(net.backbone.stem.parameters()).grad is None) == frozen


def test_settings_checked_at_config_time():
    with pytest.raises(ConfigError, match="fbr.query_mode"):
        FBRMethod.parse_settings({"plugin": "fbr", "fbr": {"query_mode": "entropy"}})
    with pytest.raises(ConfigError, match="fbr.bank_capacity"):
        FBRMethod.parse_settings({"plugin": "fbr", "fbr": {"bank_capacity": 0}})
    with pytest.raises(ConfigError, match="fbr.tau"):
        FBRMethod.parse_settings({"plugin": "fbr", "fbr": {"tau": 0.1}})


# ------------------------------------------------------------------------------ pseudo labels

def test_host_pseudo_labels_invariants():
    cam, labels, _, scores, probs, pseudo = _scene()
    assert (scores[:, 0] == 0.10).all()
    fg = scores[:, 1:]
    assert (fg >= 0).all() and (fg < 1).all()
    assert (fg[labels == 0] == 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
    for b in range(pseudo.shape[0]):
        used = set(pseudo[b].unique().tolist()) - {0}
        assert used <= {c + 1 for c in labels[b].nonzero().flatten().tolist()}


# ------------------------------------------------------------------------------ prototypes

def test_prototypes_match_loop_oracle():
    _, _, f, scores, _, pseudo = _scene(2)
    B, d, h, w = f.shape
    k = 7
    protos, valid = class_prototypes(f, scores, pseudo, k)
    for c in range(1, scores.shape[1]):
        items = []
        for b in range(B):
            for i in range(h):
                for j in range(w):
                    s = scores[b, c, i, j].item() if pseudo[b, i, j] == c else 0.0
                    items.append((s, f[b, :, i, j]))
        items.sort(key=lambda t: -t[0])
        top = items[:k]
        wsum = sum(s for s, _ in top)
        assert bool(valid[c]) == (wsum > 0)
        if wsum > 0:
            want = sum(s * v for s, v in top) / wsum
            torch.testing.assert_close(protos[c], want, rtol=1e-5, atol=1e-6)
    assert not valid[0]


def test_prototype_is_convex_and_detached():
    _, _, f, scores, _, pseudo = _scene(3)
    v = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, 0.25])
    same = v[None, :, None, None].expand_as(f).clone().requires_grad_(True)
    protos, valid = class_prototypes(same, scores, pseudo, 5)
    for c in valid.nonzero().flatten().tolist():
        torch.testing.assert_close(protos[c], v)
    assert not protos.requires_grad


# ------------------------------------------------------------------------------ queries

def oracle_queries(scores, probs, pseudo, rho_q, rho_e):
    B, ch, h, w = scores.shape
    out = np.zeros((B, h, w), dtype=bool)
    for b in range(B):
        sure = np.zeros((h, w), dtype=bool)
        for c in range(1, ch):
            vals = sorted(scores[b, c, i, j].item() for i in range(h) for j in range(w)
                          if pseudo[b, i, j] == c and scores[b, c, i, j] > 0.05)
            if not vals:
                continue
            t = vals[int(len(vals) * rho_q)]
            for i in range(h):
                for j in range(w):
                    if pseudo[b, i, j] == c and scores[b, c, i, j].item() > t:
                        sure[i, j] = True
        ent = np.array([[-sum(probs[b, k, i, j].item() * math.log(probs[b, k, i, j].item() + 1e-10)
                              for k in range(ch)) for j in range(w)] for i in range(h)])
        eta = np.quantile(ent.flatten(), rho_e)  # linear interpolation, as torch.quantile
        for i in range(h):
            for j in range(w):
                out[b, i, j] = pseudo[b, i, j] > 0 and not sure[i, j] and ent[i, j] > eta
    return out


def test_quantile_queries_match_loop_oracle():
    _, _, _, scores, probs, pseudo = _scene(4)
    got = query_mask(scores, probs, pseudo, "quantile", 0.4, 0.25)
    want = oracle_queries(scores, probs, pseudo, 0.4, 0.25)
    assert got.sum() > 0
    np.testing.assert_array_equal(got.numpy(), want)


def test_query_modes_and_monotonicity():
    _, _, _, scores, probs, pseudo = _scene(5)
    base = query_mask(scores, probs, pseudo, "quantile", 0.4, 0.25)
    assert (base <= (pseudo > 0)).all()  # Q_c ⊆ {ŷ = c}; one class per pixel: disjoint
    assert (query_mask(scores, probs, pseudo, "quantile", 0.7, 0.25) >= base).all()
    assert (query_mask(scores, probs, pseudo, "quantile", 0.4, 0.1) >= base).all()
    absolute = query_mask(scores, probs, pseudo, "absolute")
    own = scores.gather(1, pseudo[:, None])[:, 0]
    assert (own[absolute] < 0.4).all() and (absolute <= (pseudo > 0)).all()
    assert torch.equal(query_mask(scores, probs, pseudo, "all"), pseudo > 0)


def test_cap_queries_keeps_at_most_cap_per_class():
    _, _, _, scores, probs, pseudo = _scene(6)
    q = query_mask(scores, probs, pseudo, "all")
    capped = cap_queries(q, pseudo, 3, _gen(0))
    assert (capped <= q).all()
    for c in pseudo[q].unique().tolist():
        assert int((capped & (pseudo == c)).sum()) == min(3, int((q & (pseudo == c)).sum()))


# ------------------------------------------------------------------------------ K-means, NROIs, bank

def test_kmeans_recovers_separated_blobs():
    g = _gen(7)
    means = torch.randn(8, 5, generator=g) * 20
    x = (means[:, None] + 0.1 * torch.randn(8, 30, 5, generator=g)).reshape(1, 240, 5)
    x = torch.cat([x, x[:, torch.randperm(240, generator=g)]])  # two images, other order
    cent = batched_kmeans(x, torch.ones(2, 240, dtype=torch.bool), 8, 30, _gen(0))
    for b in range(2):
        got = sorted(cent[b].tolist())
        want = sorted(means.tolist())
        np.testing.assert_allclose(got, want, atol=0.1)


def test_kmeans_is_a_lloyd_fixed_point_on_valid_points():
    g = _gen(8)
    x = torch.randn(3, 60, 4, generator=g)
    valid = torch.rand(3, 60, generator=g) < 0.6
    x[~valid] += 1000.0  # masked-out points would pull a centroid far away
    cent = batched_kmeans(x, valid, 4, 100, _gen(1))
    for b in range(3):
        pts = [x[b, n] for n in range(60) if valid[b, n]]
        groups = {j: [] for j in range(4)}
        for p in pts:
            dists = [float(((p - cent[b, j]) ** 2).sum()) for j in range(4)]
            groups[dists.index(min(dists))].append(p)
        for j, members in groups.items():
            if members:
                torch.testing.assert_close(cent[b, j], torch.stack(members).mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cent, batched_kmeans(x, valid, 4, 100, _gen(1)))  # seeded


def test_kmeans_inits_keep_the_lowest_inertia_run_per_row():
    """`inits` starts (scikit-learn's n_init, the official 10): per row the result is the run of
    lowest inertia among the starts drawn one after the other from the generator, computed here
    by a loop over single starts; it is never worse than the first start alone, and on points
    where one k-means++ start often settles in a local optimum, strictly better somewhere."""
    g = _gen(9)
    means = torch.randn(6, 2, generator=g) * 6
    x = (means[torch.randint(0, 6, (5, 90), generator=g)] + 0.8 * torch.randn(5, 90, 2, generator=g))
    valid = torch.rand(5, 90, generator=g) < 0.9

    def inertia(c, b):
        return sum(min(float(((x[b, n] - c[j]) ** 2).sum()) for j in range(len(c)))
                   for n in range(90) if valid[b, n])

    got = batched_kmeans(x, valid, 5, 300, _gen(3), inits=10)
    oracle_gen, runs = _gen(3), []
    for _ in range(10):
        runs.append(batched_kmeans(x, valid, 5, 300, oracle_gen))
    for b in range(5):
        scores = [inertia(r[b], b) for r in runs]
        best = min(range(10), key=lambda i: (scores[i], i))
        # runs that reach the same partition differ in centroid order and in the last bits of
        # their inertia: compare the centroids as a set
        np.testing.assert_allclose(sorted(got[b].tolist()), sorted(runs[best][b].tolist()), atol=1e-4)
        assert inertia(got[b], b) <= scores[0] + 1e-6
    assert any(inertia(got[b], b) < inertia(runs[0][b], b) - 1e-3 for b in range(5))
    torch.testing.assert_close(batched_kmeans(x, valid, 5, 300, _gen(3), inits=1), runs[0])
    with pytest.raises(ConfigError, match="fbr.kmeans_inits"):
        batched_kmeans(x, valid, 5, 300, _gen(3), inits=0)


def test_kmeans_inits_switch_reaches_the_nrois(monkeypatch):
    """`fbr.kmeans_inits` / `fbr.kmeans_iters` are what the bank's K-means runs with."""
    import wsss_core.methods.fbr_losses as fl
    seen = []
    real = fl.batched_kmeans
    monkeypatch.setattr(fl, "batched_kmeans", lambda *a, **k: seen.append(a[3:] + a[5:]) or real(*a, **k))
    import wsss_core.methods.fbr as fbr_mod
    monkeypatch.setattr(fbr_mod, "image_nrois", lambda *a: fl.image_nrois(*a))
    m = _tiny_method(kmeans_inits=4, kmeans_iters=7)
    cam, labels, f, *_ = _scene(11, B=2, C=3, d=8)
    m.fbr_losses({"cam": cam, "fg": f, "bg_pre": torch.randn(2, 8, 9, 11)}, labels, _gen(0))
    assert seen and seen[0][0] == 7 and seen[0][-1] == 4
    with pytest.raises(ConfigError, match="fbr.kmeans_inits"):
        _tiny_method(kmeans_inits=0)


def test_nroi_counts_per_image():
    b = torch.rand(3, 4, 5, 5)
    pseudo = torch.ones(3, 5, 5, dtype=torch.long)
    pseudo[0].view(-1)[:3] = 0   # 3 background pixels → 3 raw vectors
    pseudo[1].view(-1)[:20] = 0  # 20 → K = 8 centroids
    nrois = image_nrois(b, pseudo, 8, 10, _gen(0))  # image 2: none
    assert nrois.shape == (11, 4)
    raw = b[0].flatten(1).t()[:3]
    assert any(torch.equal(nrois[i:i + 3], raw) for i in range(9))


def test_bank_fifo_and_sampling():
    bank = NROIBank(10)
    pushed = []
    for i, n in enumerate((4, 7, 3, 12, 5)):
        v = torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * i
        pushed.append(v)
        bank.push(v.requires_grad_(True))
    want = torch.cat(pushed)[-10:]
    assert torch.equal(bank.contents(), want)
    assert not bank.entries().requires_grad and bank.size == 10


# ------------------------------------------------------------------------------ FB / IF losses

def _loss_inputs(seed=9):
    cam, labels, f, scores, probs, pseudo = _scene(seed)
    query = query_mask(scores, probs, pseudo, "all")
    protos, _ = class_prototypes(f, scores, pseudo, 4)
    return f.clone().requires_grad_(True), query, pseudo, protos


def oracle_class_mean(ce_by_query, pseudo):
    present = sorted(set(pseudo[pseudo > 0].tolist()))
    total = 0.0
    for c in present:
        ces = [ce for cls, ce in ce_by_query if cls == c]
        total += sum(ces) / len(ces) if ces else 0.0
    return total / len(present)


def _ce(sims, tau):
    logits = [s / tau for s in sims]
    m = max(logits)
    return -(logits[0] - m - math.log(sum(math.exp(v - m) for v in logits)))


def _query_positions(query: torch.Tensor):
    """(b, i, j) of every query pixel of `query` [B, h, w], in the row-major order the losses
    number their queries."""
    B, h, w = query.shape
    return [(b, i, j) for b in range(B) for i in range(h) for j in range(w) if query[b, i, j]]


def test_fb_loss_matches_loop_oracle_and_gradients():
    f, query, pseudo, protos = _loss_inputs()
    bank = torch.rand(13, f.shape[1])
    loss = fb_loss(f, query, pseudo, protos, bank, 6, 0.5, _gen(3))
    idx = sample_bank_negatives(int(query.sum()), 13, 6, _gen(3))
    ce = []
    for q, (b, i, j) in enumerate(_query_positions(query)):
        c = int(pseudo[b, i, j])
        a = f[b, :, i, j].detach()
        sims = [_cos(a, protos[c])] + [_cos(a, bank[n]) for n in idx[q]]
        ce.append((c, _ce(sims, 0.5)))
    assert loss.item() == pytest.approx(oracle_class_mean(ce, pseudo), rel=1e-5)
    protos.requires_grad_(True)
    bank.requires_grad_(True)
    fb_loss(f, query, pseudo, protos, bank, 6, 0.5, _gen(3)).backward()
    assert f.grad.abs().sum() > 0 and protos.grad is None and bank.grad is None


def test_key_similarities_agree_with_a_loop():
    g = _gen(13)
    a = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    rows = torch.randn(30, 4, generator=g)
    rows[3] = 0  # a zero row: cosine 0
    idx = torch.randint(0, 30, (5, 7), generator=g)
    idx[0, 0] = 3
    idx[1, :3] = 7  # repeated draws of one row (draws are with replacement)
    idx = idx.sort(dim=1).values
    want = torch.tensor([[_cos(a[q], rows[j]) for j in idx[q]] for q in range(5)])
    torch.testing.assert_close(key_similarities(a, rows, idx), want)
    assert torch.autograd.gradcheck(lambda v: _SampledCosine.apply(v, rows.double(), idx),
                                    (a.double().requires_grad_(True),))
    with pytest.raises(ValueError, match="ascending"):
        key_similarities(a, rows, idx.flip(1))


def test_bank_negatives_are_uniform_with_replacement_and_ascending():
    idx = sample_bank_negatives(400, 7, 50, _gen(21))
    assert idx.shape == (400, 50) and idx.min() >= 0 and idx.max() <= 6
    assert bool((idx[:, 1:] >= idx[:, :-1]).all())
    assert chisquare(torch.bincount(idx.flatten(), minlength=7).numpy()).pvalue > 1e-3
    # i.i.d. per query: the count of row 0 among one query's 50 draws is Binomial(50, 1/7)
    per_query = (idx == 0).sum(1).double()
    assert per_query.mean().item() == pytest.approx(50 / 7, rel=0.05)
    assert per_query.var().item() == pytest.approx(50 / 7 * 6 / 7, rel=0.2)
    u = sorted_uniforms(1, 20000, _gen(22))[0]
    assert bool((u[1:] >= u[:-1]).all()) and 0 <= u.min() and u.max() < 1
    assert kstest(u.numpy(), "uniform").statistic < 0.02  # the sorted values are an i.i.d. sample


def test_if_loss_matches_loop_oracle_and_negatives():
    f, query, pseudo, protos = _loss_inputs(10)
    loss = if_loss(f, query, pseudo, protos, 6, 0.1, 0.5, _gen(4))
    pixels = sample_if_negatives(query, pseudo, protos, 6, 0.5, _gen(4))
    flat_f = f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    flat_lab = pseudo.flatten()
    ce = []
    for q, (b, i, j) in enumerate(_query_positions(query)):
        c = int(pseudo[b, i, j])
        for p in pixels[q].tolist():  # never own class, never background
            assert flat_lab[p] not in (0, c)
        a = f[b, :, i, j].detach()
        sims = [_cos(a, protos[c])] + [_cos(a, flat_f[p]) for p in pixels[q]]
        ce.append((c, _ce(sims, 0.1)))
    assert loss.item() == pytest.approx(oracle_class_mean(ce, pseudo), rel=1e-5)
    loss.backward()
    assert f.grad.abs().sum() > 0


def test_active_sampling_frequencies_follow_prototype_softmax():
    pseudo = torch.tensor([[[1, 2, 3, 4, 0]]]).repeat(1, 4, 1)
    protos = torch.tensor([[0, 0, 0.], [1, 0, 0], [0.9, 0.3, 0], [0, 1, 0], [-1, 0, 0.2]])
    query = pseudo == 1
    pixels = sample_if_negatives(query, pseudo, protos, 5000, 0.5, _gen(6))
    counts = torch.bincount(pseudo.flatten()[pixels.flatten()], minlength=5)[2:].numpy()
    row = active_class_distribution(protos, torch.tensor([False, True, True, True, True]), 0.5)[1]
    expected = row[2:].double().numpy()
    expected = expected / expected.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    for c in (2, 3, 4):  # within a drawn class, every pixel of that class equally often
        of_class = pixels.flatten()[pseudo.flatten()[pixels.flatten()] == c]
        assert chisquare(torch.bincount(of_class, minlength=pseudo.numel())[pseudo.flatten() == c].numpy()).pvalue > 1e-3
    cos = [_cos(protos[1], protos[c]) / 0.5 for c in (2, 3, 4)]
    np.testing.assert_allclose(row[2:].numpy(), np.exp(cos) / np.exp(cos).sum(), rtol=1e-5)


def test_loss_golden_values_and_guards():
    # every query on its prototype's direction (e1); bank / other class along e2
    pseudo = torch.tensor([[[1, 1, 2, 2, 0]]])
    f = torch.tensor([[1., 1, 0, 0, 0], [0, 0, 1, 1, 1]]).view(1, 2, 1, 5)
    protos = torch.tensor([[0., 0], [1, 0], [1, 0]])
    query = torch.tensor([[[True, True, False, False, False]]])
    bank = torch.tensor([[0., 1]]).repeat(5, 1)
    for tau in (0.5, 0.1):
        want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 256))
        got_fb = fb_loss(f, query, pseudo, protos, bank, 256, tau, _gen(0))
        got_if = if_loss(f, query, pseudo, protos, 256, tau, 0.5, _gen(0))
        # C_b = {1, 2}: class 2 has no queries and contributes 0 to the mean over |C_b| = 2
        assert got_fb.item() == pytest.approx(want / 2, rel=1e-5, abs=1e-6)
        assert got_if.item() == pytest.approx(want / 2, rel=1e-5, abs=1e-6)
    same = torch.ones(1, 2, 1, 5)
    assert fb_loss(same, query, pseudo, torch.ones(3, 2), torch.ones(5, 2), 256, 0.5, _gen(0)).item() \
        == pytest.approx(math.log(257) / 2, rel=1e-5)
    empty = torch.zeros(0, 2)
    assert fb_loss(f, query, pseudo, protos, empty, 8, 0.5, _gen(0)).item() == 0
    assert fb_loss(f, query & False, pseudo, protos, bank, 8, 0.5, _gen(0)).item() == 0
    one_class = torch.tensor([[[1, 1, 0, 0, 0]]])
    assert if_loss(f, query, one_class, protos, 8, 0.1, 0.5, _gen(0)).item() == 0
    background = torch.zeros_like(pseudo)
    assert fb_loss(f, query & False, background, protos, bank, 8, 0.5, _gen(0)).item() == 0


def test_official_switches():
    m = _tiny_method(detach_anchors=True)
    cam, labels, f, *_ = _scene(11, B=2, C=3, d=8)
    f.requires_grad_(True)
    out = {"cam": cam, "fg": f, "bg_pre": torch.randn(2, 8, 9, 11)}
    losses = m.fbr_losses(out, labels, _gen(0))
    assert not losses["fb"].requires_grad and not losses["if"].requires_grad
    # [OFFICIAL] FB axis bug: logits over the d channels, cosine along the 1+n keys
    fq, pos, keys = torch.rand(3, 4), torch.rand(3, 4), torch.rand(3, 5, 4)
    allk = torch.cat([pos[:, None], keys], 1)
    logits = F.cosine_similarity(fq[:, None].expand_as(allk), allk, dim=1) / 0.5
    from wsss_core.methods.fbr_losses import _nce_axis_bug
    torch.testing.assert_close(_nce_axis_bug(fq, pos, keys, 0.5),
                               F.cross_entropy(logits, torch.zeros(3, dtype=torch.long), reduction="none"))


def test_enqueue_before_use_gives_nonzero_fb_on_first_step():
    m = _tiny_method()
    cam, labels, f, *_ = _scene(12, B=2, C=3, d=8)
    out = {"cam": cam, "fg": f.requires_grad_(True), "bg_pre": torch.randn(2, 8, 9, 11)}
    assert m.bank.size == 0
    losses = m.fbr_losses(out, labels, _gen(0))
    assert m.bank.size > 0 and losses["fb"].item() > 0 and losses["queries"] > 0


# ------------------------------------------------------------------------------ BG seg, L_sim

def test_background_target_and_decorrelation():
    cam = torch.zeros(1, 3, 2, 2)
    cam[0, 0, 0, 0] = 10.0   # present class: peak
    cam[0, 0, 0, 1] = 0.4    # 0.04 after max-norm: still background
    cam[0, 0, 1, 0] = 0.6    # 0.06: foreground
    cam[0, 2, 1, 1] = 50.0   # absent class: ignored
    tgt = background_target(cam, torch.tensor([[1.0, 0, 0]]), 0.05)
    assert tgt.tolist() == [[[[0.0, 1.0], [0.0, 1.0]]]]
    f = torch.rand(2, 6, 3, 3)
    b = torch.rand(2, 6, 3, 3)
    assert 0 <= decorrelation_loss(f, b).item() <= 1
    disjoint_f, disjoint_b = f.clone(), b.clone()
    disjoint_f[:, 3:] = 0
    disjoint_b[:, :3] = 0
    assert decorrelation_loss(disjoint_f, disjoint_b).item() == 0
    assert decorrelation_loss(f, 3 * f).item() == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------------------ end to end

def test_tiny_step_guard_cases_and_bank_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = _tiny_method()
    opts = m.optimizers(1e-3, 1e-4, 0.9, "adamw")
    m.train()
    x = torch.randn(2, 3, 32, 32)
    for step, labels in enumerate(([[1.0, 0, 0], [0, 1, 0]],     # one class per image
                                   [[1.0, 1, 1], [1, 1, 1]],     # many classes
                                   [[0.0, 0, 0], [0, 0, 0]])):   # nothing present: no queries
        losses = m.training_step({"image": x, "label": torch.tensor(labels)},
                                 StepContext(0, step, 3, 1, CPU))
        assert torch.isfinite(losses["total"])
        losses["total"].backward()
        for o in opts:
            o.step()
            o.zero_grad()
    assert m.bank.size > 0
    save_checkpoint(tmp_path / "ck.pt", {"state": m.state_dict()})
    other = _tiny_method()
    other.load_state_dict(load_checkpoint(tmp_path / "ck.pt")["state"])
    assert torch.equal(other.bank.contents(), m.bank.contents())
    batch = {"image": x, "label": torch.tensor([[1.0, 1, 0], [0, 1, 1]])}
    m.eval(), other.eval()
    a = m.training_step(batch, StepContext(0, 7, 9, 1, CPU))
    b = other.training_step(batch, StepContext(0, 7, 9, 1, CPU))
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}
    assert torch.equal(other.bank.contents(), m.bank.contents())


@pytest.mark.slow
def test_paper_preset_step_and_cam_export_on_a_voc_sized_image(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    cfg["datasets"]["voc"]["root"] = "/nonexistent"
    params = copy.deepcopy(method_params(cfg, "voc", "fbr"))
    assert params["model"]["backbone"] == "resnet50.tv_in1k" and params["model"]["pretrained"]
    params["model"]["pretrained"] = False
    train = stage_params(cfg, "voc", "fbr", "train_classifier")
    torch.manual_seed(0)
    m = create_method(params, 21, train_params=train)
    assert m.settings.n_neg == 256 and m.settings.bank_capacity == 50000 and m.settings.nroi_k == 8
    opts = m.optimizers(train["lr"], train["weight_decay"], train["momentum"], train["optimizer"])
    size = (375, 500)
    label = torch.zeros(1, 20)
    label[0, [4, 14]] = 1
    m.train()
    losses = m.training_step({"image": torch.randn(1, 3, *size), "label": label},
                             StepContext(0, 0, 10, train["epochs"], CPU))
    assert {"cls", "fb", "if", "bg", "sim"} <= set(losses) and torch.isfinite(losses["total"])
    before = m.models["cnn"].fg_proj.weight.clone()
    losses["total"].backward()
    for o in opts:
        o.step()
    assert not torch.equal(before, m.models["cnn"].fg_proj.weight)
    m.eval()
    img = torch.randn(3, *size)
    scales = stage_params(cfg, "voc", "fbr", "export_cams")["scales"][:1]  # 1.0: one export, not four
    scaled = [F.interpolate(img[None], scale_factor=s, mode="bilinear")[0] for s in scales]
    maps = image_maps(m, scaled, size, [5, 15], CPU)
    assert maps["cam"].shape == (2,) + size and np.isfinite(maps["cam"]).all()

"""Feature-distillation modules (VID, FT, ReviewKD fusion, CRD) against numpy references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdflow.losses import (
    ABF,
    CRDLoss,
    Paraphraser,
    ReviewFusion,
    Translator,
    VIDLoss,
    factor_transfer,
    hcl,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(value, ref, rel=1e-5, abs_=1e-7):
    if isinstance(value, torch.Tensor):
        value = value.detach()
    assert float(value) == pytest.approx(ref, rel=rel, abs=abs_)


def params(module):
    return {k: v.detach().numpy().astype(np.float64) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- VID


def np_conv1x1(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A 1×1 convolution without bias (the benchmark's VID regressor has none)."""
    n, _, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = x[:, :, i, j] @ w[:, :, 0, 0].T
    return out


def np_vid(module: VIDLoss, s: np.ndarray, t: np.ndarray, reduction: str) -> float:
    p = params(module)
    assert not any(k.endswith(".bias") for k in p)
    h = np.maximum(np_conv1x1(s, p["regressor.0.weight"]), 0)
    h = np.maximum(np_conv1x1(h, p["regressor.2.weight"]), 0)
    mu = np_conv1x1(h, p["regressor.4.weight"])
    var = np.log1p(np.exp(p["variance_param"])) + module.eps
    b, c, hh, ww = t.shape
    total = 0.0
    for n in range(b):
        for ch in range(c):
            for i in range(hh):
                for j in range(ww):
                    total += (t[n, ch, i, j] - mu[n, ch, i, j]) ** 2 / (2 * var[ch]) + 0.5 * math.log(var[ch])
    return total / (b * c * hh * ww) if reduction == "mean" else total / b


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("hidden", [None, 4])
def test_vid_matches_numpy(reduction, hidden):
    torch.manual_seed(0)
    vid = VIDLoss(2, 3, hidden_channels=hidden, reduction=reduction)
    with torch.no_grad():
        vid.variance_param.copy_(torch.tensor([0.3, -1.0, 2.0]))
    s, t = rand(2, 2, 3, 3, seed=1), rand(2, 3, 3, 3, seed=2)
    close(vid(s, t), np_vid(vid, s.numpy().astype(np.float64), t.numpy().astype(np.float64), reduction))


def test_vid_initial_variance_and_state_dict():
    vid = VIDLoss(2, 3, init_variance=5.0, eps=1e-5)
    torch.testing.assert_close(vid.variance(), torch.full((3,), 5.0), rtol=1e-6, atol=1e-6)
    keys = set(vid.state_dict())
    assert "variance_param" in keys
    assert {"regressor.0.weight", "regressor.2.weight", "regressor.4.weight"} <= keys
    assert vid.regressor[0].out_channels == 3  # hidden defaults to the teacher's channels


def test_vid_gradients():
    torch.manual_seed(1)
    vid = VIDLoss(2, 3)
    s = rand(3, 2, 2, 2, seed=3).requires_grad_(True)
    t = rand(3, 3, 2, 2, seed=4)
    vid(s, t).backward()
    assert vid.variance_param.grad is not None and vid.variance_param.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vid.parameters())
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_vid_pools_larger_map_and_is_batch_order_invariant():
    torch.manual_seed(2)
    vid = VIDLoss(2, 3)
    s, t = rand(3, 2, 4, 4, seed=5), rand(3, 3, 2, 2, seed=6)
    pooled = torch.nn.functional.adaptive_avg_pool2d(s, (2, 2))
    close(vid(s, t), float(vid(pooled, t).detach()))
    perm = torch.tensor([1, 2, 0])
    close(vid(s[perm], t[perm]), float(vid(s, t).detach()))


def test_vid_finite_for_large_inputs():
    torch.manual_seed(3)
    vid = VIDLoss(2, 2)
    s = (rand(2, 2, 2, 2, seed=7) * 1e3).requires_grad_(True)
    value = vid(s, rand(2, 2, 2, 2, seed=8) * 1e3)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- FT


def test_paraphraser_and_translator_shapes_and_losses():
    torch.manual_seed(4)
    para = Paraphraser(4, rate=0.5)
    assert para.factor_channels == 2
    assert Paraphraser(4, 3).factor_channels == 3 and Paraphraser(5).factor_channels == 2  # ⌊0.5·5⌋
    # the benchmark's shapes: no batch norm in the paraphraser, batch norm in the translator; biased convs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in para.modules())
    trans = Translator(3, para.factor_channels)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trans.modules()) == 3
    assert all(m.bias is not None for m in [*para.modules(), *trans.modules()] if isinstance(m, torch.nn.Conv2d))
    ft_map, fs_map = rand(2, 4, 3, 3, seed=9), rand(2, 3, 3, 3, seed=10).requires_grad_(True)
    factor_t = para(ft_map)
    assert factor_t.shape == (2, 2, 3, 3)
    recon = para.decode(para.encode(ft_map))
    assert recon.shape == ft_map.shape
    close(para.reconstruction_loss(ft_map, p=1), float((recon - ft_map).abs().mean().detach()))
    close(para.reconstruction_loss(ft_map), float(((recon - ft_map) ** 2).mean().detach()))
    # FT step: paraphraser frozen (teacher side), translator and student get gradients
    loss = factor_transfer(trans(fs_map), factor_t.detach())
    loss.backward()
    assert fs_map.grad is not None and fs_map.grad.abs().sum() > 0
    assert all(p.grad is not None for p in trans.parameters())
    assert all(p.grad is None for p in para.parameters())


def test_paraphraser_reconstruction_trains_all_parameters():
    torch.manual_seed(5)
    para = Paraphraser(3, 2)
    para.reconstruction_loss(rand(2, 3, 2, 2, seed=11)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in para.parameters())


# --------------------------------------------------------------------------- ReviewKD


def test_abf_fusion_formula():
    torch.manual_seed(6)
    abf = ABF(3, 4, 5, fuse=True).eval()
    x, r = rand(2, 3, 4, 4, seed=12), rand(2, 4, 2, 2, seed=13)
    out, res = abf(x, r, out_size=(2, 2))
    # reference built step by step from the block's parts
    with torch.no_grad():
        y = abf.conv1(x)
        r_up = r.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest ×2
        w = abf.att_conv[0]
        logits = torch.einsum("oc,bchw->bohw", w.weight[:, :, 0, 0], torch.cat([y, r_up], 1)) + w.bias.view(1, -1, 1, 1)
        a = torch.sigmoid(logits)
        fused = y * a[:, :1] + r_up * a[:, 1:]
        fused_small = fused[:, :, ::2, ::2]  # nearest ×½
        torch.testing.assert_close(res, fused_small)
        torch.testing.assert_close(out, abf.conv2(fused_small))
    assert out.shape == (2, 5, 2, 2)


def test_abf_residual_rules():
    abf = ABF(3, 4, 5, fuse=False)
    out, res = abf(rand(2, 3, 2, 2))
    assert out.shape == (2, 5, 2, 2) and res.shape == (2, 4, 2, 2)
    with pytest.raises(ValueError):
        abf(rand(2, 3, 2, 2), rand(2, 4, 2, 2))
    with pytest.raises(ValueError):
        ABF(3, 4, 5, fuse=True)(rand(2, 3, 2, 2))


def make_review():
    torch.manual_seed(7)
    fusion = ReviewFusion([2, 3, 4], [3, 5, 6], mid_channels=4)
    feats = [rand(2, 2, 4, 4, seed=14), rand(2, 3, 2, 2, seed=15), rand(2, 4, 1, 1, seed=16)]
    return fusion, feats


def test_review_fusion_shapes_and_direction():
    fusion, feats = make_review()
    fusion.eval()
    assert [a.fuse for a in fusion.abfs] == [True, True, False]
    outs = fusion(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1)]
    outs_sized = fusion(feats, out_sizes=[(8, 8), (4, 4), (2, 2)])
    assert [tuple(o.shape[-2:]) for o in outs_sized] == [(8, 8), (4, 4), (2, 2)]
    # deep → shallow: changing the deepest stage changes every output,
    # changing the shallowest changes only its own
    deep = list(feats)
    deep[2] = deep[2] + 1.0
    outs_deep = fusion(deep)
    assert all(not torch.allclose(a, b) for a, b in zip(outs, outs_deep))
    shallow = list(feats)
    shallow[0] = shallow[0] + 1.0
    outs_shallow = fusion(shallow)
    assert not torch.allclose(outs[0], outs_shallow[0])
    torch.testing.assert_close(outs[1], outs_shallow[1])
    torch.testing.assert_close(outs[2], outs_shallow[2])


def test_review_fusion_gradients_with_hcl():
    fusion, feats = make_review()
    feats = [f.requires_grad_(True) for f in feats]
    teacher = [rand(2, 3, 4, 4, seed=17), rand(2, 5, 2, 2, seed=18), rand(2, 6, 1, 1, seed=19)]
    loss = hcl(fusion(feats), teacher)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    named = dict(fusion.named_parameters())
    assert named["abfs.0.att_conv.0.weight"].grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert all(t.grad is None for t in teacher)


# --------------------------------------------------------------------------- CRD

M, D, K, B = 6, 4, 3, 3
EPS = 1e-7  # RepDistiller's ContrastLoss adds it to the NCE denominators


def np_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_crd(p, es, et, contrast, tau, z=None):
    """Two-sided NCE loss of CRD over contrast sets (positive first); returns (loss, (z_s, z_t), (v_s, v_t))."""
    v_s = np_normalize(es @ p["embed_s.weight"].T + p["embed_s.bias"])
    v_t = np_normalize(et @ p["embed_t.weight"].T + p["embed_t.bias"])
    c = K / M
    zs = []
    total = 0.0
    for side, (v, bank) in enumerate([(v_s, p["memory_t"]), (v_t, p["memory_s"])]):
        e = np.array([[math.exp(float(np.dot(bank[j], v[b])) / tau) for j in contrast[b]] for b in range(B)])
        zz = e.mean() * M if z is None else z[side]
        zs.append(zz)
        e = e / zz
        loss = 0.0
        for b in range(B):
            loss += math.log(e[b, 0] / (e[b, 0] + c + EPS))
            for k in range(1, K + 1):
                loss += math.log(c / (e[b, k] + c + EPS))
        total += -loss / B
    return total, zs, (v_s, v_t)


def make_crd(seed=0, form="auto"):
    torch.manual_seed(seed)
    return CRDLoss(5, 7, num_data=M, feat_dim=D, num_negatives=K, temperature=0.5, momentum=0.3,
                   generator=torch.Generator().manual_seed(seed + 100), mode="uniform", form=form)


def contrast_of(idx, seed):
    neg = torch.randint(0, M, (B, K), generator=torch.Generator().manual_seed(seed))
    return torch.cat([idx.unsqueeze(1), neg], dim=1)


def test_crd_buffers_in_state_dict():
    crd = make_crd()
    sd = crd.state_dict()
    assert sd["memory_s"].shape == (M, D) and sd["memory_t"].shape == (M, D)
    assert {"z_s", "z_t", "embed_s.weight", "embed_t.weight"} <= set(sd)
    assert "memory_s" not in dict(crd.named_parameters())
    assert "labels" not in sd  # the labels are data, not state
    # a fresh module loads the banks and Z back
    other = make_crd(seed=9)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.memory_t, crd.memory_t)


@pytest.mark.parametrize("form", ["matmul", "gather"])
def test_crd_loss_matches_numpy_and_updates_banks(form):
    crd = make_crd(form=form)
    assert crd.form == form
    es, et = rand(B, 5, seed=20), rand(B, 7, seed=21)
    idx = torch.tensor([4, 0, 2])
    p = params(crd)
    contrast = contrast_of(idx, 123)
    ref, zs, (v_s, v_t) = np_crd(p, es.numpy().astype(np.float64), et.numpy().astype(np.float64), contrast.numpy(), 0.5)

    loss = crd(es, et, idx, contrast_indices=contrast)
    close(loss, ref, rel=1e-5)
    close(crd.z_s, zs[0], rel=1e-5)
    close(crd.z_t, zs[1], rel=1e-5)

    # momentum update for the batch's rows, others untouched
    m = 0.3
    for bank, old, v in [("memory_s", p["memory_s"], v_s), ("memory_t", p["memory_t"], v_t)]:
        new = getattr(crd, bank).numpy()
        expected = old.copy()
        expected[idx.numpy()] = np_normalize(m * old[idx.numpy()] + (1 - m) * v)
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)

    # second batch: Z is kept from the first, banks are the updated ones
    p2 = params(crd)
    es2, et2, idx2 = rand(B, 5, seed=22), rand(B, 7, seed=23), torch.tensor([1, 5, 3])
    contrast2 = contrast_of(idx2, 7)
    ref2, _, _ = np_crd(p2, es2.numpy().astype(np.float64), et2.numpy().astype(np.float64), contrast2.numpy(), 0.5, z=zs)
    close(crd(es2, et2, idx2, contrast_indices=contrast2), ref2, rel=1e-5)


def test_crd_float64_in_float64_out():
    crd = make_crd().double()
    es, et, idx = rand(B, 5, seed=20).double(), rand(B, 7, seed=21).double(), torch.tensor([4, 0, 2])
    p = {k: v.detach().numpy() for k, v in crd.state_dict().items()}
    contrast = contrast_of(idx, 123)
    loss = crd(es, et, idx, contrast_indices=contrast)
    ref, _, _ = np_crd(p, es.numpy(), et.numpy(), contrast.numpy(), 0.5)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_crd_reproducible_and_given_contrast_used_once():
    es, et, idx = rand(B, 5, seed=24), rand(B, 7, seed=25), torch.tensor([0, 1, 2])
    a = make_crd().eval()(es, et, idx, generator=torch.Generator().manual_seed(5))
    b = make_crd().eval()(es, et, idx, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    crd = make_crd().eval()
    drawn = crd.sample_contrast(idx, torch.Generator().manual_seed(5))
    assert drawn.shape == (B, K + 1) and torch.equal(drawn[:, 0], idx)
    crd.use_contrast(drawn)
    assert crd(es, et, idx).item() == a.item()
    assert crd.given_contrast is None  # consumed by that call
    with pytest.raises(ValueError, match="contrast_indices"):
        crd(es, et, idx, contrast_indices=drawn[:, 1:])  # the positive column is missing


def test_crd_eval_mode_does_not_update_banks():
    crd = make_crd().eval()
    before = crd.memory_s.clone(), crd.memory_t.clone()
    crd(rand(B, 5, seed=26), rand(B, 7, seed=27), torch.tensor([0, 3, 5]), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(crd.memory_s, before[0])
    torch.testing.assert_close(crd.memory_t, before[1])


@pytest.mark.parametrize("form", ["matmul", "gather"])
def test_crd_gradients(form):
    crd = make_crd(form=form)
    es = rand(B, 5, seed=28).requires_grad_(True)
    et = rand(B, 7, seed=29)
    loss = crd(es, et, torch.tensor([2, 3, 4]), generator=torch.Generator().manual_seed(2))
    loss.backward()  # after the banks' update: the matmul form's backward still reads the bank it used
    assert torch.isfinite(loss)
    assert es.grad is not None and es.grad.abs().sum() > 0
    assert et.grad is None
    for name in ("embed_s.weight", "embed_t.weight"):
        g = dict(crd.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_crd_forms_agree_in_value_and_gradient():
    es, et, idx = rand(B, 5, seed=40), rand(B, 7, seed=41), torch.tensor([1, 2, 3])
    contrast = contrast_of(idx, 9)
    grads = []
    for form in ("matmul", "gather"):
        crd = make_crd(form=form)
        e = es.clone().requires_grad_(True)
        loss = crd(e, et, idx, contrast_indices=contrast)
        loss.backward()
        grads.append((loss.detach(), e.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_crd_finite_for_large_inputs():
    crd = CRDLoss(5, 7, num_data=M, feat_dim=D, num_negatives=K, mode="uniform")  # τ = 0.07
    es = (rand(B, 5, seed=30) * 1e4).requires_grad_(True)
    loss = crd(es, rand(B, 7, seed=31) * 1e4, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(es.grad).all()


def test_crd_class_modes_need_labels():
    with pytest.raises(ValueError, match="labels"):
        CRDLoss(5, 7, num_data=M, feat_dim=D, num_negatives=K)  # mode exact by default

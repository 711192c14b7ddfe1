"""fused_sppo_loss and sppo_loss against the reference composite, for every loss type."""

import pytest
import torch

import sppo_fast
from sppo_fast import reference as R

from _data import make_batch
from conftest import DTYPES, TRITON_DEVICE, assert_as_accurate, max_err


def _probs(B, gen, dtype=torch.float64):
    u = torch.rand(3, B, generator=gen, dtype=dtype)
    return {"chosen_probs_win": 0.5 + u[0] / 2, "chosen_probs_lose": u[1] / 2, "chosen_probs": u[2]}


def _sppo_mean(pol, ref_logps, probs, beta, loss_type):
    B = pol.shape[0] // 2
    p = {k: v.to(pol.dtype) for k, v in probs.items()}
    ref = ref_logps.to(pol.dtype)
    return R.sppo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type, **p).mean()


def _ref_loss(logits, labels, ref_logps, probs, beta, loss_type):
    pol = R.sequence_logps(logits, labels)
    return _sppo_mean(pol, ref_logps, probs, beta, loss_type), pol


def _check_fused(backend, dtype, loss_type, gen, *, B=3, T=97, V=1271, masked=4, token_rounding=False,
                 **batch):
    """fused_sppo_loss through ``backend`` against the float64 reference composite: policy log-probs,
    loss, logits gradient (upstream gradient 0.37), the fully masked sequence ``masked`` (zero
    gradient) and the metrics. ``batch``: extra make_batch arguments (huge logits).

    ``token_rounding``: for |logits| ~ 1e4 each float32 token log-prob rounds by ~1e-3 (kernel and
    reference alike, independently), so the kernel's loss may be off by more than the float32
    reference's by chance. Then the loss and gradient also get the error that the kernel's own
    token log-probs (float64-summed; held to float64 by the token_logprobs tests) carry into them:
    sum_s |dloss/dlogp_s| * err_s, and up * (2 / B) * max_s err_s for the gradient."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    logits, labels = make_batch(2 * B, T, V, dtype, gen, fully_masked=(masked,), **batch)
    probs = _probs(B, gen)
    beta = 0.1  # targets of a few nats, comparable to the random log-ratios
    # log-ratios a = -noise; the chosen wins (a_w > a_l) in a fraction of the pairs other than 1/2,
    # so that a reversed rewards/accuracies comparison shows
    noise = torch.randn(2 * B, generator=gen, dtype=torch.float64)
    if 2 * (noise[B:] > noise[:B]).sum().item() == B:
        noise[[0, B]] = noise[[B, 0]]
    with torch.no_grad():
        ref_logps = R.sequence_logps(logits.double(), labels) + noise

    xt = logits.double().requires_grad_()
    truth, truth_pol = _ref_loss(xt, labels, ref_logps, probs, beta, loss_type)
    xs = logits.clone().requires_grad_()
    same, same_pol = _ref_loss(xs, labels, ref_logps, probs, beta, loss_type)
    x = logits.to(device).requires_grad_()
    loss, pol, metrics = sppo_fast.fused_sppo_loss(
        x, labels.to(device), ref_logps.to(device), beta=beta, loss_type=loss_type, backend=backend,
        **{k: v.to(device) for k, v in probs.items()})
    assert loss.dim() == 0 and pol.shape == (2 * B,)
    loss, pol = loss.cpu(), pol.cpu()
    # rtol: one float32 ulp of the sums (huge logits: sums ~5e5)
    assert_as_accurate(pol, same_pol, truth_pol, atol=2e-4, rtol=2**-23, what="policy logps")
    up = 0.37  # upstream gradient other than 1
    loss_tol, grad_tol = 2e-3, 1e-6
    if token_rounding:
        with torch.no_grad():
            tok = sppo_fast.token_logprobs(logits.to(device), labels.to(device), backend=backend)
            err = (tok.cpu().double().sum(-1) - truth_pol).abs()
        p64 = truth_pol.detach().clone().requires_grad_()
        g_pol, = torch.autograd.grad(_sppo_mean(p64, ref_logps, probs, beta, loss_type), p64)
        loss_tol += (g_pol.abs() * err).sum().item()
        grad_tol += up * (2 / B) * err.max().item()
    assert_as_accurate(loss, same, truth, atol=loss_tol, rtol=1e-5, what="loss")

    (truth * up).backward()
    (same * up).backward()
    (loss * up).backward()
    # rtol: one output ulp (bf16, fp16) of the largest gradient entry; for fp32, the float32
    # rounding of the ~-700-nat sequence sums that set each sequence's coefficient (a - target)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    grad = x.grad.cpu()
    assert_as_accurate(grad, xs.grad, xt.grad, atol=grad_tol, rtol=rtol, what="grad logits")
    assert (grad[masked] == 0).all()

    # metrics: TRL names, detached, each against its definition evaluated on the float64 truth
    # (truth policy logps, ref_logps, reference targets), written out here, not via ops._metrics
    _check_metrics(metrics, truth_pol.detach(), same_pol.detach(), ref_logps, probs, beta, loss_type)


METRIC_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "targets/chosen", "targets/rejected"}


def _check_metrics(metrics, truth_pol, same_pol, ref_logps, probs, beta, loss_type):
    """Every metric fused_sppo_loss returns, against float64 truth.

    The kernel's policy log-probs are held (above) to the same-dtype reference's error + 2e-4 +
    one float32 ulp of the sums: that bound (``pol_tol``), plus the float32 rounding of ref_logps
    and of the B-term means, bounds each metric's error. The accuracy is a comparison: pairs
    whose truth log-ratios are closer than their error may go either way, every other pair must
    count as in the truth."""
    assert set(metrics) == METRIC_NAMES, sorted(metrics)
    assert not any(v.requires_grad for v in metrics.values())
    assert all(v.dim() == 0 for v in metrics.values())
    m = {k: v.cpu().double() for k, v in metrics.items()}
    B = truth_pol.shape[0] // 2
    ulp = 2**-23
    pol_scale = truth_pol.abs().max().item()
    pol_tol = max_err(same_pol, truth_pol) + 2e-4 + ulp * pol_scale
    # a = policy - ref: the policy's error, ref_logps rounded to float32, the difference rounded
    a_tol = pol_tol + 2 * ulp * ref_logps.abs().max().item()
    a_w, a_l = truth_pol[:B] - ref_logps[:B], truth_pol[B:] - ref_logps[B:]
    t_w, t_l = R.sppo_targets(beta=beta, loss_type=loss_type, **probs)
    t_w = torch.as_tensor(t_w, dtype=torch.float64).expand(B)
    t_l = torch.as_tensor(t_l, dtype=torch.float64).expand(B)

    def close(name, want, atol, rtol):
        got = m[name].item()
        want = want.item()
        assert abs(got - want) <= atol + rtol * abs(want), \
            f"{name}: {got!r} vs truth {want!r} (tolerance {atol + rtol * abs(want):.3g})"

    close("logps/chosen", truth_pol[:B].mean(), pol_tol + B * ulp * pol_scale, 1e-6)
    close("logps/rejected", truth_pol[B:].mean(), pol_tol + B * ulp * pol_scale, 1e-6)
    close("rewards/chosen", beta * a_w.mean(), beta * a_tol, 1e-5)
    close("rewards/rejected", beta * a_l.mean(), beta * a_tol, 1e-5)
    close("rewards/margins", beta * (a_w - a_l).mean(), 2 * beta * a_tol, 1e-5)
    # targets: probabilities rounded to float32, then (P - 1/2) / beta * beta
    close("targets/chosen", beta * t_w.mean(), 1e-6, 1e-5)
    close("targets/rejected", beta * t_l.mean(), 1e-6, 1e-5)
    d = a_w - a_l
    clear = d.abs() > 2 * a_tol
    lo = (clear & (d > 0)).double().mean().item()  # chosen clearly ahead
    hi = (~clear | (d > 0)).double().mean().item()  # ... or too close to call
    acc = m["rewards/accuracies"].item()
    assert lo - 1e-6 <= acc <= hi + 1e-6, \
        f"rewards/accuracies: {acc!r} outside the truth's [{lo!r}, {hi!r}] (a_w - a_l = {d.tolist()})"


@pytest.mark.parametrize("loss_type", sppo_fast.LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference(loss_type, dtype, gen):
    _check_fused("cpp", dtype, loss_type, gen)  # 2B = 6 sequences


@pytest.mark.parametrize("loss_type", sppo_fast.LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_triton(loss_type, dtype, gen):
    """The Triton path (interpreter here) in every dtype, with a fully masked sequence."""
    pytest.importorskip("triton")
    _check_fused("triton", dtype, loss_type, gen, B=2, T=23, V=515, masked=1)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_huge_logits(backend, dtype, gen):
    """|logits| ~ 1e4 (float16: ~6e3, its range ends at 65504), sums ~ -1e5 nats."""
    if backend == "triton":
        pytest.importorskip("triton")
    huge = dict(scale=2000.0) if dtype == torch.float16 else dict(huge=True)
    _check_fused(backend, dtype, "sppo", gen, B=2, T=17, V=515, masked=2, token_rounding=True, **huge)


def test_fused_released_beta_float32(gen):
    """beta = 0.001 (targets up to +-500 nats): the float32 path stays as accurate as the reference."""
    B, T, V = 4, 64, 503
    logits, labels = make_batch(2 * B, T, V, torch.float32, gen)
    probs = _probs(B, gen)
    ref_logps = torch.randn(2 * B, generator=gen, dtype=torch.float64) * 50 - 200
    xt = logits.double().requires_grad_()
    truth, _ = _ref_loss(xt, labels, ref_logps, probs, 0.001, "sppo")
    xs = logits.clone().requires_grad_()
    same, _ = _ref_loss(xs, labels, ref_logps, probs, 0.001, "sppo")
    x = logits.clone().requires_grad_()
    loss, _, _ = sppo_fast.fused_sppo_loss(x, labels, ref_logps, beta=0.001, backend="cpp", **probs)
    assert_as_accurate(loss, same, truth, atol=1e-2, rtol=1e-6, what="loss")
    truth.backward(); same.backward(); loss.backward()
    assert_as_accurate(x.grad, xs.grad, xt.grad, atol=1e-4, rtol=1e-6, what="grad")


def test_fused_reference_backend_agrees(gen):
    B = 2
    logits, labels = make_batch(2 * B, 19, 211, torch.float64, gen)
    probs = _probs(B, gen)
    ref_logps = torch.randn(2 * B, generator=gen, dtype=torch.float64)
    out = {}
    for be in ("reference", "cpp"):
        x = logits.clone().requires_grad_()
        loss, pol, m = sppo_fast.fused_sppo_loss(x, labels, ref_logps, beta=0.5, backend=be, **probs)
        loss.backward()
        out[be] = (loss, pol, x.grad, m)
    torch.testing.assert_close(out["cpp"][0], out["reference"][0], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out["cpp"][2], out["reference"][2], rtol=1e-10, atol=1e-12)
    for k in out["cpp"][3]:
        torch.testing.assert_close(out["cpp"][3][k], out["reference"][3][k], rtol=1e-10, atol=1e-10)


def test_gradcheck_fused_float64(gen):
    B = 2
    logits, labels = make_batch(2 * B, 4, 7, torch.float64, gen, scale=1.0)
    probs = _probs(B, gen)
    ref_logps = torch.randn(2 * B, generator=gen, dtype=torch.float64)
    for loss_type in sppo_fast.LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda t: sppo_fast.fused_sppo_loss(t, labels, ref_logps, beta=2.0, loss_type=loss_type,
                                                backend="cpp", **probs)[0],
            (logits.clone().requires_grad_(),))


def test_sppo_loss_formulas_by_hand():
    """Numbers worked out by hand from the official formulas (sppo/trainer.py, TRL sppo_hard)."""
    pc, pr = torch.tensor([-10.0]), torch.tensor([-20.0])
    rc, rr = torch.tensor([-12.0]), torch.tensor([-18.0])
    # a_w = 2, a_l = -2, beta = 0.5 -> 1/beta = 2
    p_win, p_lose, p = torch.tensor([0.75]), torch.tensor([0.25]), torch.tensor([0.9])
    # sppo: ((2 - 2*0.25)^2 + (-2 - 2*(-0.25))^2) / 2 = (2.25 + 2.25) / 2 = 2.25
    got = sppo_fast.sppo_loss(pc, pr, rc, rr, chosen_probs_win=p_win, chosen_probs_lose=p_lose, beta=0.5)
    assert got.item() == pytest.approx(2.25)
    # sppo_single: ((2 - 2*0.4)^2 + (-2 + 2*0.4)^2) / 2 = (1.44 + 1.44) / 2 = 1.44
    got = sppo_fast.sppo_loss(pc, pr, rc, rr, chosen_probs=p, beta=0.5, loss_type="sppo_single")
    assert got.item() == pytest.approx(1.44)
    # sppo_hard: (2 - 1)^2 + (-2 + 1)^2 = 2 (no halving)
    got = sppo_fast.sppo_loss(pc, pr, rc, rr, beta=0.5, loss_type="sppo_hard")
    assert got.item() == pytest.approx(2.0)


def test_sppo_loss_gradient_is_per_sequence_scalar(gen):
    """dloss/dlogp_w = (a_w - target_w) / n_pairs and dloss/dlogp_l = (a_l - target_l) / n_pairs for
    loss_type sppo: what makes fusion exact."""
    B = 5
    pol = torch.randn(2 * B, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.randn(2 * B, generator=gen, dtype=torch.float64)
    pr = _probs(B, gen)
    loss = sppo_fast.sppo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta=0.25,
                               chosen_probs_win=pr["chosen_probs_win"],
                               chosen_probs_lose=pr["chosen_probs_lose"]).mean()
    loss.backward()
    a_w = pol[:B].detach() - ref[:B]
    a_l = pol[B:].detach() - ref[B:]
    expect_w = (a_w - 4 * (pr["chosen_probs_win"] - 0.5)) / B
    expect_l = (a_l - 4 * (pr["chosen_probs_lose"] - 0.5)) / B
    torch.testing.assert_close(pol.grad[:B], expect_w)
    torch.testing.assert_close(pol.grad[B:], expect_l)  # the rejected half too


def test_convergence_tiny_model(gen):
    """Train a tiny LM a few steps with the fused loss (float32) and with the reference (float64):
    the same loss each step. Plain SGD: Adam's normalised steps make a trajectory chaotic, so that
    float32 rounding alone (in the reference too) moved the loss by 3e-3 within 8 steps for some seeds;
    with SGD the gap stayed under 1.1e-5 over 1500 seeds."""
    V, H, T, B = 257, 32, 24, 4
    torch.manual_seed(1234)
    emb = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V)
    tokens = torch.randint(0, V, (2 * B, T), generator=gen)
    labels = tokens.clone()
    labels[:, :6] = -100
    labels = sppo_fast.next_token_labels(labels)
    probs = {"chosen_probs_win": torch.rand(B, generator=gen) / 2 + 0.5,
             "chosen_probs_lose": torch.rand(B, generator=gen) / 2}
    with torch.no_grad():
        ref_logps = R.sequence_logps(head(torch.tanh(emb(tokens))), labels)

    def run(backend, dtype):
        e, h = [m.__class__(*a) for m, a in ((emb, (V, H)), (head, (H, V)))]
        e.load_state_dict(emb.state_dict()), h.load_state_dict(head.state_dict())
        e, h = e.to(dtype), h.to(dtype)
        opt = torch.optim.SGD(list(e.parameters()) + list(h.parameters()), lr=3e-3)
        losses = []
        for _ in range(8):
            logits = h(torch.tanh(e(tokens)))
            loss, _, _ = sppo_fast.fused_sppo_loss(logits, labels, ref_logps.to(dtype), beta=0.1, backend=backend,
                                                   **{k: v.to(dtype) for k, v in probs.items()})
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fused, ref = run("cpp", torch.float32), run("reference", torch.float64)
    assert fused[-1] < fused[0]  # it learns
    for a, b in zip(fused, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_long_sequences_near_target(dtype, gen):
    """Regression for the float64 sums of the token log-probs (commit 1ef8ab2): ~1000-token
    sequences (sums of ~-7500 nats) whose log-ratio sits 0.05..0.1 nats from its target. In float32
    the sums and ref_logps alone round by up to ~5e-4 nats, several 1e-3 of that gap; from float64
    sums of the float32 token log-probs the gap keeps ~3e-4 relative accuracy. Held to float64
    truth with no same-dtype allowance: each sequence's gradient (its coefficient times
    onehot - softmax) and the loss."""
    B, T, V = 4, 1000, 64
    logits, labels = make_batch(2 * B, T, V, dtype, gen, ignore_frac=0.05)
    probs = _probs(B, gen)
    beta = 0.1
    xt = logits.double().requires_grad_()
    with torch.no_grad():
        pol = R.sequence_logps(xt, labels)
    t_w, t_l = R.sppo_targets(beta=beta, **{k: probs[k] for k in ("chosen_probs_win", "chosen_probs_lose")})
    sign = torch.randint(0, 2, (2 * B,), generator=gen, dtype=torch.float64) * 2 - 1
    gap = 0.05 * (1 + torch.rand(2 * B, generator=gen, dtype=torch.float64)) * sign
    ref_logps = pol - torch.cat([t_w, t_l]) - gap  # log-ratio a = target + gap
    truth, _ = _ref_loss(xt, labels, ref_logps, probs, beta, "sppo")
    x = logits.clone().requires_grad_()
    loss, _, _ = sppo_fast.fused_sppo_loss(x, labels, ref_logps, beta=beta, backend="cpp", **probs)
    up = 0.37
    (truth * up).backward()
    (loss * up).backward()
    assert abs(loss.item() - truth.item()) <= 3e-3 * truth.item(), (loss.item(), truth.item())
    # bf16 gradients also round to 8 bits, 2^-8 of an entry: on top
    rtol = 1.5e-3 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    for s in range(2 * B):  # gradient of sequence s: (gap_s / B) * up * (onehot - softmax)
        scale = xt.grad[s].abs().max().item()
        err = (x.grad[s].double() - xt.grad[s]).abs().max().item()
        assert err <= rtol * scale, f"sequence {s}: gradient error {err:.3g} > {rtol:.3g} * {scale:.3g}"

"""Tests for spd.py: each numeric check against an independent reference (hand-made tensors,
dense re-computation, loops). Run: python -m pytest -q"""
import collections
import copy
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2_facts
import induction
import spd

torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to a busy core


# -----------------------------------------------------------------------------
# a tiny attention-only model with the module names of induction.py

class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d, bias=False)
                                                                for _ in range(4))

    def forward(self, x, pos):
        q, k, v = self.q_proj(x + pos), self.k_proj(x + pos), self.v_proj(x)
        S = x.shape[1]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
            torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        return self.out_proj(scores.softmax(-1) @ v)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attn(d)


class Tiny(nn.Module):
    def __init__(self, vocab=11, d=8, n_layers=2, seq=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.unembed = nn.Linear(d, vocab)

    def forward(self, t):
        x, p = self.embed(t), self.pos[: t.shape[1]]
        for b in self.blocks:
            x = x + b.attn(x, p)
        return self.unembed(x)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw)


def config_for(s, **kw):
    """spd.Config with the C, CI function and D_gate s was built with (train checks them)."""
    return spd.Config(C=s.spec["C"], ci=s.spec["ci"], d_gate=s.spec["d_gate"], **kw)


def copy_decomposition(src, dst):
    keep = {n for n, p in src.named_parameters() if p.requires_grad}
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in keep}, strict=False)


def linear_and_conv1d_twins():
    """The same layer as nn.Linear and as GPT-2's Conv1D, each decomposed, with equal U, V, CI."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 3))
    conv = nn.Sequential(Conv1D(3, 5))
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight.T)
        conv[0].bias.copy_(lin[0].bias)
    a, b = spd.SPDModel(lin, "0", C=4), spd.SPDModel(conv, "0", C=4)
    copy_decomposition(a, b)
    return lin, conv, a, b


def exact_components(s):
    """Set U V = W exactly (needs C >= min(d_out, d_in)): U = W, V = I padded."""
    with torch.no_grad():
        for layer in s.layers.values():
            d_out, d_in = layer.W.shape
            layer.V.zero_()
            layer.U.zero_()
            layer.V[:d_in] = torch.eye(d_in)
            layer.U[:, :d_in] = layer.W


# -----------------------------------------------------------------------------
# 1-2. decomposed layers, Linear vs Conv1D, model running modes

def test_faithfulness_hand_computation():
    m = tiny()
    s = spd.SPDModel(m, ["blocks.0.attn.q_proj", "unembed"], C=3)   # 8 x 8 and 11 x 8: the mean is
    num, count = 0.0, 0                                               # over all entries, not per layer
    for layer in s.layers.values():
        W, U, V = layer.W.double(), layer.U.double(), layer.V.double()
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                num += (W[i, j] - sum(U[i, c] * V[c, j] for c in range(3))) ** 2
                count += 1
    assert torch.allclose(spd.faithfulness_loss(s).double(), num / count, rtol=1e-5)


def test_linear_and_conv1d_agree():
    lin, conv, a, b = linear_and_conv1d_twins()
    x = torch.randn(2, 7, 5)
    alpha = torch.rand(2, 7, 4)
    assert torch.allclose(spd.faithfulness_loss(a), spd.faithfulness_loss(b), rtol=1e-6, atol=0)
    assert torch.allclose(a(x, {"0": alpha}), b(x, {"0": alpha}), atol=1e-6)
    assert torch.allclose(a(x), lin(x), atol=1e-6) and torch.allclose(b(x), lin(x), atol=1e-6)
    # the decomposed output is the formula U (alpha ⊙ V x) + b, computed by hand
    L = a.layers["0"]
    ref = torch.einsum("oc,bsc,ci,bsi->bso", L.U, alpha, L.V, x) + lin[0].bias
    assert torch.allclose(a(x, {"0": alpha}), ref, atol=1e-6)


def test_exact_components_reproduce_target():
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.*", C=8)
    exact_components(s)
    t = torch.randint(0, 11, (3, 6))
    ones = {n: torch.ones(3, 6, 8) for n in s.layers}
    assert spd.faithfulness_loss(s).item() == 0
    assert torch.allclose(s(t, ones), m(t), atol=1e-5)
    assert torch.equal(s(t), m(t))  # no mask: the target itself


def test_run_mask_sets_equals_separate_forwards():
    """The batched forward (rows, index_copy) equals one forward per mask set."""
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.*", C=5)
    t = torch.randint(0, 11, (3, 6))
    names = list(s.layers)
    sets = [{}, {n: torch.rand(3, 6, 5) for n in names}, {names[2]: torch.rand(3, 6, 5)},
            {names[0]: torch.rand(3, 6, 5), names[5]: torch.rand(3, 6, 5)}]
    batched = s.run_mask_sets(t, sets)
    for k, masks in enumerate(sets):
        assert torch.allclose(batched[k], s(t, masks), atol=1e-6)
    # a layer absent from a set really is the target weight there
    only = s(t, {names[2]: torch.ones(3, 6, 5)})
    ref = m.__class__.forward(s.model, t)  # same modules, mask state cleared: target
    assert torch.allclose(ref, m(t), atol=1e-6) and not torch.allclose(only, m(t), atol=1e-3)


def test_target_forward_records_inputs():
    m = tiny()
    s = spd.SPDModel(m, "blocks.0.attn.v_proj", C=2)
    t = torch.randint(0, 11, (2, 6))
    logits, inputs = s.target_forward(t)
    assert torch.equal(logits, m(t))
    assert torch.allclose(inputs["blocks.0.attn.v_proj"], m.embed(t))


class Reused(nn.Module):
    """A layer `a` called `calls` times per forward, registered once or (alias) twice."""
    def __init__(self, calls=1, alias=False):
        super().__init__()
        self.embed, self.a, self.out, self.calls = nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 11), calls
        if alias:
            self.b = self.a

    def forward(self, x):
        h = self.embed(x)
        for _ in range(self.calls):
            h = self.a(h)
        return self.out(h)


def test_a_layer_called_twice_or_never_or_registered_twice_is_refused():
    """Silently wrong otherwise: the CI would read one call's input, an alias would stay the target."""
    t = torch.randint(0, 11, (2, 5))
    with pytest.raises(spd.SPDError, match="'a' is also registered as 'b': .* its own copy"):
        spd.SPDModel(Reused(alias=True), "a", C=2)
    with pytest.raises(spd.SPDError, match="layer 'a' ran 2 times in one forward: .*its own copy"):
        spd.SPDModel(Reused(calls=2), "a", C=2).target_forward(t)
    with pytest.raises(spd.SPDError, match="layer 'a' ran 0 times in one forward: .*calls once$"):
        spd.causal_importances(spd.SPDModel(Reused(calls=0), "a", C=2), t)
    s = spd.SPDModel(Reused(), "a", C=2)
    s.target_forward(t)
    assert all(l.inputs is None for l in s.layers.values())


# -----------------------------------------------------------------------------
# 3. causal importance

def test_gamma_mlps_match_a_loop_over_c():
    torch.manual_seed(0)
    C, H, n_in = 4, 3, 5
    vec, sca = spd.GammaMLPs(C, H, n_in), spd.GammaMLPs(C, H)
    x, V = torch.randn(2, 3, n_in), torch.randn(C, n_in)
    a = x @ V.T                                               # the scalar CI's inner activations V_c x
    for c in range(C):
        W1 = vec.W1[c * H:(c + 1) * H]                       # γ_c's own first layer (H, n_in)
        ref = F.gelu(x @ W1.T + vec.b1[c * H:(c + 1) * H]) @ vec.W2[c] + vec.b2[c]
        assert torch.allclose(vec(x)[..., c], ref, atol=1e-6)
        ref = F.gelu(a[..., c:c + 1] * sca.W1[c] + sca.b1[c * H:(c + 1) * H]) @ sca.W2[c] + sca.b2[c]
        assert torch.allclose(sca(x, V)[..., c], ref, atol=1e-6)


def value_and_grads(f, tensors, seed=1):
    out = f()
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, tensors, g, allow_unused=True)
    return [out, *(torch.zeros(()) if v is None else v for v in grads)]


def use_chunked_gamma(module, on):
    for m in module.modules():
        if isinstance(m, spd.GammaMLPs):
            m.chunked = on


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("rows", [7, 27])
@pytest.mark.parametrize("ci", ["scalar", "vector", "attention"])
def test_chunked_gamma_equals_reference(ci, rows, keep, monkeypatch):
    """The fast CPU path of the γ-MLPs (_ChunkedGamma) against GammaMLPs.reference, float64:
    the CI's output and the gradient into every parameter and into the input; in chunks of 7
    of the 27 tokens (a ragged last) and in one, with h and gelu(h) kept from forward or h
    recomputed in backward (N·C·H above KEEP)."""
    d, C, H = 5, 6, 4
    monkeypatch.setattr(spd._ChunkedGamma, "FLOATS", rows * C * H)
    monkeypatch.setattr(spd._ChunkedGamma, "KEEP", 27 * C * H if keep else 27 * C * H - 1)
    torch.manual_seed(0)
    f = spd.make_ci(ci, d, C, H, max_seq_len=9).double()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(torch.randn_like(p) * 0.5)                  # biases off zero, r off zero
    x = torch.randn(3, 9, d, dtype=torch.float64, requires_grad=True)
    V = torch.randn(C, d, dtype=torch.float64, requires_grad=True)
    tensors = [x, V, *f.parameters()]
    got = {}
    calls, hidden = [], spd._ChunkedGamma.hidden
    monkeypatch.setattr(spd._ChunkedGamma, "hidden", staticmethod(lambda *a: calls.append(1) or hidden(*a)))
    for chunked in (False, True):
        use_chunked_gamma(f, chunked)
        got[chunked] = value_and_grads(lambda: f(x, V), tensors)
    assert len(calls) == (1 if rows == 27 else 4) * (1 if keep else 2)  # chunks; again in backward
    for a, b in zip(got[False], got[True]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ci", ["scalar", "vector", "attention"])
def test_chunked_gamma_second_derivative(ci):
    """With create_graph (a second derivative) the chunked path differentiates the plain form (its
    own backward writes in place, and a kept h has no graph): the second derivative of |dL/dθ|²
    into the input and every parameter equals the reference's; a retained graph runs twice."""
    torch.manual_seed(0)
    f = spd.make_ci(ci, 5, 6, 4, max_seq_len=9).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    V = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    tensors = [x, V, *f.parameters()]

    def second(chunked):
        use_chunked_gamma(f, chunked)
        first = torch.autograd.grad((f(x, V) ** 2).sum(), tensors, create_graph=True, allow_unused=True)
        total = sum((g ** 2).sum() for g in first if g is not None)
        return [g for g in torch.autograd.grad(total, tensors, allow_unused=True) if g is not None]
    for a, b in zip(second(True), second(False), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    f = spd.GammaMLPs(6, 4, 5).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    f.chunked = True
    y = f(x).sum()
    assert torch.equal(*(torch.autograd.grad(y, [f.W1], retain_graph=True)[0] for _ in range(2)))


def test_chunked_gamma_frees_what_it_kept():
    """One chunk: h and gelu(h) are kept from forward for backward, and backward lets them go."""
    f = spd.GammaMLPs(3, 2, 4)
    f.chunked = True
    out = f(torch.randn(2, 5, 4))
    node = out.grad_fn.next_functions[0][0]                           # (out is a view of its output)
    assert type(node).__name__ == "_ChunkedGammaBackward" and node.kept is not None
    out.sum().backward()
    assert node.kept is None


def test_fused_minimality_equals_plain():
    """importance_minimality_loss_fused(pre) = importance_minimality_loss(σ_H^upper(pre)), value
    and gradient, float64, at the kinks (0, 1) and on both sides, for p a float or a tensor."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(600, dtype=torch.float64) * 1.5,
                   torch.tensor([0.0, 1.0, -1e-3, 1e-3, 2.0, 1.0 + 1e-9], dtype=torch.float64)])
    x = x.view(2, -1, 3).requires_grad_()
    w = torch.rand(2, x.shape[1], dtype=torch.float64)
    for p, weight in [(0.9, None), (0.5, w), (torch.tensor(0.3, dtype=torch.float64), w)]:
        plain = value_and_grads(lambda: spd.importance_minimality_loss(
            {"a": spd.leaky_hard_sigmoid(x, upper=True)}, p, weight), [x])
        fused = value_and_grads(lambda: spd.importance_minimality_loss_fused({"a": x}, p, weight), [x])
        for a, b in zip(plain, fused):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_fast_step_equals_plain_step(monkeypatch):
    """A whole training step with the fast paths (chunked γ-MLPs, fused minimality) equals the
    plain one, float64: every loss term and the gradient of every trainable parameter."""
    s = spd.SPDModel(tiny(), "blocks.*.attn.*", C=6, ci="attention", d_gate=4, max_seq_len=6).double()
    cfg = spd.Config(ci="attention", beta_layerwise_recon=1, beta_stochastic_partial_recon=1)
    x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    params = s.trainable_parameters()
    plain_minimality = lambda pre, p, w=None: spd.importance_minimality_loss(
        {n: spd.leaky_hard_sigmoid(v, upper=True) for n, v in pre.items()}, p, w)
    got = []
    for fast in (True, False):
        with monkeypatch.context() as mp:
            if not fast:
                mp.setattr(spd, "importance_minimality_loss_fused", plain_minimality)
            use_chunked_gamma(s, fast)
            torch.manual_seed(0)                                # the same masks and subsets
            total, terms, _ = spd.training_step(s, x, cfg, 3)
            got.append([total, *terms.values(), *torch.autograd.grad(total, params)])
    for a, b in zip(*got):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_final_only_forward_gives_the_same_losses():
    """SPDModel(final_only_kwargs=...) unembeds the final position only, and the induction
    model then runs its last layer's final query only (the masks of the decomposed out_proj
    sliced to match); the final-position losses and their gradients are those of the full
    forward."""
    target = induction.InductionTransformer(vocab_size=10, d_model=8, max_seq_len=12)
    x = induction.make_batch(4, 12, 10, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(target(x, final_only=True), target(x)[:, -1], atol=1e-6)
    cfg = spd.Config(ci="vector", beta_layerwise_recon=1)
    got = []
    for kw in (None, induction.FINAL_ONLY):
        torch.manual_seed(0)
        s = spd.SPDModel(target, list(induction.decomposed_matrices(True).values()), C=5,
                         ci="vector", d_gate=4, final_only_kwargs=kw)
        total, terms, _ = spd.training_step(s, x, cfg, 0)
        got.append([*terms.values(), *torch.autograd.grad(total, s.trainable_parameters())])
    for a, b in zip(*got):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture
def ctrl_c_fails():
    """Ctrl-C that reaches the test (the code under test should have handled it) fails the test,
    instead of stopping pytest."""
    import signal
    def unhandled(*a):
        raise AssertionError("Ctrl-C reached the caller")
    old = signal.signal(signal.SIGINT, unhandled)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_in_faithfulness_warmup_stops_after_one_step(monkeypatch, tmp_path, ctrl_c_fails):
    import signal
    def interrupted(*a):
        signal.raise_signal(signal.SIGINT)                  # Ctrl-C while the warm-up runs
        return 0.0
    monkeypatch.setattr(spd, "faithfulness_warmup", interrupted)
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    cfg = config_for(s, steps=5, faithfulness_warmup_steps=5)
    ckpt = str(tmp_path / "c.pt")
    with pytest.raises(spd.SPDError, match="interrupted after step 0; saved .*--resume=true"):
        spd.train(s, cfg, lambda: torch.randint(0, 11, (2, 6)), log=lambda *a: None, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["c.pt", "c.pt.lock"]


def test_two_runs_on_one_checkpoint_at_once(tmp_path):
    """The second run stops with one line, and the first run's lock is its own: it is left alone."""
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    ckpt = str(tmp_path / "c.pt")
    with spd._locked(ckpt):
        with pytest.raises(spd.SPDError, match="another run is using .*c.pt: wait for it, or pass another --out_dir"):
            spd.train(s, config_for(s, steps=2), lambda: torch.randint(0, 11, (2, 6)),
                      log=lambda *a: None, checkpoint=ckpt)
        assert os.path.exists(ckpt + ".lock")
    spd.train(s, config_for(s, steps=2), lambda: torch.randint(0, 11, (2, 6)),
              log=lambda *a: None, checkpoint=ckpt)                      # free again: it runs
    assert os.listdir(tmp_path) == ["c.pt.lock"]                         # finished: no checkpoint; the
    with spd._locked(ckpt):                                              # empty lock file is free again
        pass


def test_a_whole_run_lock_is_its_threads_and_a_lock_file_it_cannot_open_is_one_line(tmp_path):
    """A script holding its folder's lock for the whole run (whole_run) lets train, in its own
    thread, take it as its own; another thread of the process does not get it."""
    import threading
    ckpt, got = str(tmp_path / "c.pt"), []

    def other():
        try:
            with spd._locked(ckpt):
                got.append("locked")
        except spd.SPDError as e:
            got.append(str(e))
    with spd._locked(ckpt, whole_run=True):
        with spd._locked(ckpt):                                          # (train's, same thread)
            t = threading.Thread(target=other)
            t.start()
            t.join()
    assert got == [f"another run is using {ckpt}: wait for it, or pass another --out_dir"] and not spd._HELD
    os.remove(ckpt + ".lock")
    os.mkdir(ckpt + ".lock")                                   # (a lock file that cannot be opened)
    with pytest.raises(spd.SPDError, match=r"cannot open the lock file .*c.pt.lock \(Is a directory\): "
                                           r"delete it, or pass another --target_path"):
        with spd._locked(ckpt, "--target_path"):
            pass


def test_a_resumed_run_takes_the_lock_too(tmp_path):
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    ckpt, batch = str(tmp_path / "c.pt"), lambda: torch.randint(0, 11, (2, 6))
    cfg = config_for(s, steps=3, checkpoint_every=1)
    spd.train(s, cfg, batch, log=lambda *a: None, checkpoint=ckpt)       # (saved after step 2 of 3)
    with spd._locked(ckpt):
        with pytest.raises(spd.SPDError, match="another run is using"):
            spd.train(s, dataclasses.replace(cfg, resume=True), batch, log=lambda *a: None, checkpoint=ckpt)
    assert spd.train(s, dataclasses.replace(cfg, resume=True), batch, log=lambda *a: None,
                     checkpoint=ckpt)[-1]["step"] == 2


def test_resuming_another_targets_checkpoint_says_so(tmp_path):
    """A checkpoint of another target (another script's run in this folder) is named as such, not
    as a config to match (which could not work)."""
    batch, ckpt = lambda: torch.randint(0, 11, (2, 6)), str(tmp_path / "c.pt")
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    spd.train(s, config_for(s, steps=3, checkpoint_every=1), batch, log=lambda *a: None, checkpoint=ckpt)
    other = spd.SPDModel(tiny(seed=1), "blocks.0.attn.q_proj", C=8, ci="vector", d_gate=4)
    with pytest.raises(spd.SPDError, match="c.pt was made for a different target"):
        spd.train(other, config_for(other, steps=3, resume=True), batch, log=lambda *a: None, checkpoint=ckpt)
    more = spd.SPDModel(tiny(), "blocks.0.attn.*_proj", C=4, ci="vector", d_gate=4)   # (the same target)
    with pytest.raises(spd.SPDError, match=r"c.pt was made by an SPDModel with patterns=\[blocks.0.attn.q_proj\]"):
        spd.train(more, config_for(more, steps=3, resume=True), batch, log=lambda *a: None, checkpoint=ckpt)
    os.remove(ckpt)                                   # and the other way round, and no layer in common
    spd.train(more, config_for(more, steps=3, checkpoint_every=1), batch, log=lambda *a: None, checkpoint=ckpt)
    for patterns in ("blocks.0.attn.q_proj", "blocks.1.attn.q_proj"):
        fewer = spd.SPDModel(tiny(), patterns, C=4, ci="vector", d_gate=4)
        with pytest.raises(spd.SPDError, match=r"c.pt was made by an SPDModel with patterns=\[blocks.0.attn.q_proj, "):
            spd.train(fewer, config_for(fewer, steps=3, resume=True), batch, log=lambda *a: None, checkpoint=ckpt)
    half = tiny()                                     # (q as the run's target, k not)
    with torch.no_grad():
        half.blocks[0].attn.k_proj.weight.add_(1)
    fewer = spd.SPDModel(half, "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    with pytest.raises(spd.SPDError, match="c.pt was made for a different target: layer 'blocks.0.attn.k_proj' differs"):
        spd.train(fewer, config_for(fewer, steps=3, resume=True), batch, log=lambda *a: None, checkpoint=ckpt)


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl
    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")              # e.g. Lustre without flock
    monkeypatch.setattr(fcntl, "flock", no_locks)
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    spd.train(s, config_for(s, steps=2), lambda: torch.randint(0, 11, (2, 6)),
              log=lambda *a: None, checkpoint=str(tmp_path / "c.pt"))
    assert os.listdir(tmp_path) == ["c.pt.lock"]


def test_compiled_step_compiles_once(monkeypatch):
    """With step passed as a tensor (what train does with --compile=true), p and β_minimality
    are tensors and torch.compile traces the step once for every step, not once per value."""
    import torch._dynamo
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    s = spd.SPDModel(tiny(), "blocks.*.attn.*", C=4, ci="vector", d_gate=4)
    cfg = spd.Config(ci="vector", steps=3, minimality_decay_from=0.3)  # p and β_minimality move
    x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    step = torch.compile(spd.training_step, backend="eager")
    for i in range(3):                                          # raises if it recompiles
        torch.manual_seed(i)
        compiled = step(s, x, cfg, torch.tensor(i))[0]
        torch.manual_seed(i)
        assert torch.allclose(compiled, spd.training_step(s, x, cfg, i)[0], rtol=1e-5)
    torch._dynamo.reset()


def test_compiled_gradient_repeats_exactly_under_deterministic():
    """Without the guard train puts around a compiled run, 9 of 9 repeats of this gradient
    (inductor, 2 threads) differed from the first here."""
    from torch._inductor.exc import InductorError
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    try:
        f = torch.compile(spd.ci_attention)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(8, 64, 8, generator=gen) for _ in range(3))

        def grad():
            r = torch.zeros(127, requires_grad=True)
            f(q, k, v, r).square().sum().backward()
            return r.grad
        with spd._deterministic(True):
            assert torch.are_deterministic_algorithms_enabled()
            try:
                first = grad()
            except InductorError as e:                          # e.g. no C++ compiler here
                pytest.skip(f"inductor cannot compile here: {str(e).splitlines()[0]}")
            assert all(torch.equal(first, grad()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert torch.are_deterministic_algorithms_enabled() == was   # the guard restores the flag


MALLOC_CHECK = """
import ctypes, resource, sys, torch, spd
if sys.argv[1] == "on":
    assert spd.keep_freed_memory()
class Info(ctypes.Structure):                                   # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                              "uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
x = torch.empty(4 << 20)
mapped = mallinfo2().hblkhd >= 16 << 20                         # x has its own mmap, not the heap
del x
def faults():   # minor page faults while 16 MB is made and written, after two 16 MB blocks were freed
    a, b = torch.empty(4 << 20).fill_(1.0), torch.empty(4 << 20).fill_(1.0)
    del a, b
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(4 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(mapped, [faults() for _ in range(4)][-1])
"""


def test_keep_freed_memory_reuses_freed_memory():
    """In a fresh process (the setting is process-wide, and other tests set it in this one): by
    default glibc gives a 16 MB block its own mmap, handed back to the OS when freed, so the next
    one is faulted in afresh, 4 KB at a time; with keep_freed_memory the block comes from the heap
    and the freed memory is reused (the last of four calls: no faults)."""
    import ctypes
    import platform
    import resource
    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("not glibc >= 2.33: keep_freed_memory is a no-op, or mallinfo2 is missing")
    out = {on: subprocess.run([sys.executable, "-c", MALLOC_CHECK, on], cwd=HERE, check=True,
                              capture_output=True, text=True).stdout.split() for on in ("off", "on")}
    assert out["off"][0] == "True" and out["on"][0] == "False", out
    assert int(out["on"][1]) < (16 << 20) // resource.getpagesize() // 10, out


def test_train_compiles_under_the_deterministic_guard(monkeypatch):
    """--compile=true: train runs the compiled step with deterministic algorithms on (and
    turns them off after); uncompiled steps leave the flag alone."""
    seen, training_step = [], spd.training_step

    def step(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return training_step(*args)
    monkeypatch.setattr(spd, "training_step", step)
    monkeypatch.setattr(torch, "compile", lambda f: f)
    s = spd.SPDModel(tiny(), "blocks.*.attn.*", C=4, ci="vector", d_gate=4)
    for compile in (True, False):
        cfg = config_for(s, steps=2, compile=compile)
        spd.train(s, cfg, lambda: torch.randint(0, 11, (2, 6)), log=lambda *a: None)
    assert seen == [True, True, False, False] and not torch.are_deterministic_algorithms_enabled()


def test_a_failing_compile_is_one_line(monkeypatch):
    """Inductor without a C++ compiler raises deep inside torch; train says what to do."""
    from torch._inductor.exc import InductorError

    def broken(*args):
        raise InductorError(RuntimeError("No working C++ compiler found\n(more lines)"), None)
    monkeypatch.setattr(torch, "compile", lambda f: broken)
    s = spd.SPDModel(tiny(), "blocks.*.attn.*", C=4, ci="vector", d_gate=4)
    cfg = config_for(s, steps=2, compile=True)
    with pytest.raises(spd.SPDError, match=r"torch.compile failed \(RuntimeError: No working C\+\+ "
                                           r"compiler found\); run with --compile=false$"):
        spd.train(s, cfg, lambda: torch.randint(0, 11, (2, 6)), log=lambda *a: None)
    monkeypatch.setattr(torch, "compile", lambda f: lambda *a: 1 / 0)   # not the backend's: as is
    with pytest.raises(ZeroDivisionError):
        spd.train(s, cfg, lambda: torch.randint(0, 11, (2, 6)), log=lambda *a: None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("causal", [True, False])
def test_attention_fallback_equals_flex(causal):
    torch.manual_seed(0)
    B, S, d = 2, 12, 16
    q, k, v, r = torch.randn(B, S, d), torch.randn(B, S, d), torch.randn(B, S, d), torch.randn(2 * S - 1)
    try:
        with torch.no_grad():
            flex = spd.ci_attention(q, k, v, r, causal, flex=True)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex-attention cannot run here: {type(e).__name__}")
    math_path = spd.ci_attention(q, k, v, r, causal, flex=False)
    assert torch.allclose(flex, math_path, atol=1e-5)
    # and both equal a loop over query/key pairs (Eq. 4 written out)
    ref = torch.zeros(B, S, d)
    for i in range(S):
        js = range(i + 1) if causal else range(S)
        scores = torch.stack([(q[:, i] * k[:, j]).sum(-1) + r[i - j + S - 1] for j in js], -1)
        w = (scores / math.sqrt(d)).softmax(-1)
        ref[:, i] = sum(w[:, n, None] * v[:, j] for n, j in enumerate(js))
    assert torch.allclose(math_path, ref, atol=1e-5)


def test_attention_picks_flex_on_cuda_only_where_its_kernels_run(monkeypatch):
    """flex=None: flex-attention for CUDA tensors with head size 16, 32, 64 or 128 (torch 2.13's Triton
    kernels refuse d < 16; larger or padded sizes may not fit in shared memory in fp32), plain math
    for the rest."""
    used = []
    monkeypatch.setattr(spd, "_flex_attention", lambda q, *a: used.append(q.shape[-1]) or q)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "cpu"))  # pretend
    for d in (8, 15, 16, 24, 32, 64, 100, 128, 256, 768):
        q, r = torch.randn(1, 4, d), torch.zeros(7)
        spd.ci_attention(q, q, q, r)
    assert used == [16, 32, 64, 128]


def test_attention_ci_is_position_dependent():
    torch.manual_seed(0)
    ci = spd.AttentionCI(d=8, C=5, H=4, max_seq_len=10)
    with torch.no_grad():
        ci.rel.normal_()
    x = torch.randn(1, 1, 8).expand(1, 10, 8)  # the same token at every position
    g = ci(x)
    assert not torch.allclose(g[0, 3], g[0, 7], atol=1e-4)
    vec = spd.make_ci("vector", 8, 5, 4)
    assert torch.allclose(vec(x)[0, 3], vec(x)[0, 7])  # the vector CI cannot tell them apart
    with pytest.raises(spd.SPDError, match="max_seq_len"):
        ci(torch.randn(1, 11, 8))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_ci_equals_eq4_written_as_a_loop(causal):
    """Eq. 4 / Algorithm 1 by hand, one query at a time, for S < max_seq_len (so the relative bias
    table is read at offsets i - j of its middle): x_pos = x + AbsPos, q = Q x, k = K x, v = V x_pos,
    a_i = softmax_j((q_i·k_j + r[i - j]) / √d) v_j over j <= i (all j if not causal),
    g_i = γ(a_i ⊕ x_pos_i). make_ci and SPDModel pass `causal` on."""
    torch.manual_seed(0)
    d, C, H, M, S = 4, 3, 2, 9, 5
    ci = spd.make_ci("attention", d, C, H, max_seq_len=M, causal=causal).double()
    with torch.no_grad():
        ci.rel.normal_()
        ci.abs.normal_()
    x = torch.randn(2, S, d, dtype=torch.float64)
    ref = torch.empty(2, S, C, dtype=torch.float64)
    for b in range(2):
        x_pos = x[b] + ci.abs[:S]
        for i in range(S):
            js = range(i + 1) if causal else range(S)
            scores = torch.stack([(ci.q.weight @ x[b, i]) @ (ci.k.weight @ x[b, j]) + ci.rel[i - j + M - 1]
                                  for j in js]) / math.sqrt(d)
            a = sum(w * (ci.v.weight @ x_pos[j]) for w, j in zip(scores.softmax(0), js))
            ref[b, i] = ci.gamma.reference(torch.cat([a, x_pos[i]]))
    assert torch.allclose(ci(x), ref, atol=1e-12)
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=3, ci="attention", d_gate=2, max_seq_len=6, causal=causal)
    assert s.layers["blocks.0.attn.q_proj"].ci.causal is causal


# -----------------------------------------------------------------------------
# 4. leaky hard sigmoids and masks

def test_leaky_hard_sigmoids():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    lo = spd.leaky_hard_sigmoid(x)
    assert torch.equal(lo, torch.tensor([0.0, 0.5, 1.0]))
    lo.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.01, 1.0, 0.0]))
    x.grad = None
    up = spd.leaky_hard_sigmoid(x, upper=True)
    assert torch.allclose(up, torch.tensor([0.0, 0.5, 1.02]))
    up.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 0.01]))


def test_sample_masks_distribution_and_gradient():
    torch.manual_seed(0)
    g = torch.tensor([0.0, 0.3, 0.9, 1.0]).repeat(200_000, 1).requires_grad_()
    alpha = spd.sample_masks(g)
    assert alpha.shape == g.shape
    assert (alpha >= g).all() and (alpha <= 1).all()
    assert torch.equal(alpha[:, 3], torch.ones(200_000))
    lo = g[0].detach()
    assert torch.allclose(alpha.mean(0), (1 + lo) / 2, atol=3e-3)           # mean of U(g, 1)
    assert torch.allclose(alpha.var(0), (1 - lo) ** 2 / 12, atol=2e-3)      # variance of U(g, 1)
    alpha.sum().backward()
    assert (g.grad > 0).all()  # d alpha / d g = 1 - u
    a = spd.sample_masks(torch.zeros(20_000, 2, 2))                    # (B, S, C): u independent per
    corr = torch.corrcoef(torch.stack([a[:-1, 0, 0], a[:-1, 1, 0], a[:-1, 0, 1], a[1:, 0, 0]]))
    assert corr[0, 1:].abs().max() < 0.05                              # position, subcomponent, item


# -----------------------------------------------------------------------------
# 5. losses

def test_kl_divergence_hand_computation():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    q = torch.tensor([[0.4, 0.6], [0.9, 0.1]])
    ref = ((p * (p / q).log()).sum(-1)).mean()
    assert torch.allclose(spd.kl_divergence(q.log(), p.log()), ref, atol=1e-6)
    w = torch.tensor([1.0, 0.0])
    assert torch.allclose(spd.kl_divergence(q.log(), p.log(), w), (p[0] * (p[0] / q[0]).log()).sum())
    assert spd.kl_divergence(p.log(), p.log()).abs() < 1e-7


def test_minimality_hand_computation():
    g = {"a": torch.tensor([[[0.5, 0.0], [1.0, 0.25]]]), "b": torch.tensor([[[0.0], [0.0]]])}
    p = 0.5
    ref = ((0.5 ** p + 0) + (1 + 0.25 ** p)) / 2  # Σ over layers and c, mean over positions
    assert abs(spd.importance_minimality_loss(g, p).item() - ref) < 1e-5
    zeros = {"a": torch.zeros(2, 3, 4, requires_grad=True)}
    loss = spd.importance_minimality_loss(zeros, 0.1)
    assert loss.item() == 0
    loss.backward()
    assert torch.isfinite(zeros["a"].grad).all()
    small = torch.full((1, 1, 1), 1e-4, requires_grad=True)
    spd.importance_minimality_loss({"a": small}, 0.5).backward()   # d/dg g^p = p g^(p-1)
    assert small.grad.item() == pytest.approx(0.5 * 1e-4 ** -0.5, rel=1e-4)


def test_minimality_at_another_p_fused_and_weighted():
    """Value and gradient of Σ_c g^p at p = 0.3 (p = 0.5 cannot tell p from 1 - p), the fused form on
    pre-sigmoid values (upper-leaky: 1 + 0.01 (x - 1) above 1, 0 below 0), and a weight (B, S)."""
    p = 0.3
    pre = torch.tensor([[[-0.5, 0.2], [0.7, 1.5]]], dtype=torch.float64, requires_grad=True)  # (1, 2, 2)
    g = torch.tensor([[[0.0, 0.2], [0.7, 1.005]]], dtype=torch.float64)
    per_position = (g > 0) * g ** p                                   # (1, 2, 2)
    slope = torch.tensor([[[0.0, 1.0], [1.0, 0.01]]], dtype=torch.float64)
    w = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    for weight, avg in [(None, lambda t: t.sum(-1).mean()), (w, lambda t: (t.sum(-1) * w).sum() / w.sum())]:
        for fused in (False, True):
            pre.grad = None
            loss = (spd.importance_minimality_loss_fused({"a": pre}, p, weight) if fused else
                    spd.importance_minimality_loss({"a": spd.leaky_hard_sigmoid(pre, upper=True)}, p, weight))
            assert loss.item() == pytest.approx(avg(per_position).item(), rel=1e-9)
            loss.backward()
            hand = torch.autograd.functional.jacobian(lambda t: avg(t), per_position)   # d loss / d term
            ref = hand * p * torch.where(g > 0, g, 1.0) ** (p - 1) * slope
            assert torch.allclose(pre.grad, ref, rtol=1e-6), (weight, fused)


def test_training_step_feeds_minimality_the_pre_sigmoid_values_and_draws_n_mask_samples(monkeypatch):
    """The minimality term is Σ_c σ_H^upper(pre)^p at the step's p (pre above 1 counts 1 + 0.01 (x-1),
    which g, clipped at 1, would not), and n_mask_samples masks are drawn per layer."""
    s = spd.SPDModel(tiny(), "blocks.*.attn.q_proj", C=4, ci="vector", d_gate=4)
    with torch.no_grad():
        for layer in s.layers.values():
            layer.ci.W2.mul_(0.05)
            layer.ci.b2.fill_(2.0)                                     # every γ above 1
    cfg = spd.Config(ci="vector", steps=10, n_mask_samples=3)
    calls = []
    monkeypatch.setattr(spd, "sample_masks", lambda g: calls.append(1) or torch.rand_like(g) * (1 - g) + g)
    x = torch.randint(0, 11, (2, 6))
    _, terms, _ = spd.training_step(s, x, cfg, step=4)
    assert len(calls) == 3 * len(s.layers)
    pre = s.causal_importance(s.target_forward(x)[1])
    assert min(v.min() for v in pre.values()) > 1
    p = spd.minimality_p(cfg, 4)
    ref = sum((1 + 0.01 * (v - 1)) ** p for v in pre.values()).sum(-1).mean()
    assert terms["minimality"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_stochastic_losses_train_the_ci_through_the_masks():
    """alpha = g + (1 - g) u keeps g's gradient: the stochastic reconstruction alone moves the CI."""
    s = spd.SPDModel(tiny(), "blocks.*.attn.*", C=4, ci="vector", d_gate=4)
    cfg = spd.Config(ci="vector", steps=10, beta_faithfulness=0, beta_minimality=0, beta_recon=0,
                     beta_stochastic_layerwise_recon=0, beta_stochastic_recon=1)
    torch.manual_seed(0)
    total, _, _ = spd.training_step(s, torch.randint(0, 11, (4, 6)), cfg, step=0)
    total.backward()
    for layer in s.layers.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.ci.parameters())


def test_reconstruction_losses_zero_and_dense_reference():
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.*", C=8)
    t = torch.randint(0, 11, (4, 6))
    target = m(t)
    names = list(spd.RECONSTRUCTIONS)
    # exact components and g = 1: every reconstruction is the target, every loss 0
    exact_components(s)
    g1 = {n: torch.ones(4, 6, 8) for n in s.layers}
    R1 = [{n: spd.sample_masks(v) for n, v in g1.items()} for _ in range(2)]
    for last in (False, True):
        for v in spd.reconstruction_losses(s, t, target, g1, R1, names, last_token_only=last).values():
            assert v.abs().item() < 1e-6
    # random g: each loss equals a dense recomputation with one forward per mask set
    torch.manual_seed(1)
    g = {n: torch.rand(4, 6, 8) for n in s.layers}
    R = [{n: spd.sample_masks(v) for n, v in g.items()} for _ in range(2)]
    got = spd.reconstruction_losses(s, t, target, g, R, names[:4])
    kl = lambda masks: spd.kl_divergence(s(t, masks), target)
    assert torch.allclose(got["recon"], kl(g), atol=1e-6)
    assert torch.allclose(got["stochastic_recon"], (kl(R[0]) + kl(R[1])) / 2, atol=1e-6)
    assert torch.allclose(got["layerwise_recon"],
                          sum(kl({n: g[n]}) for n in g) / len(g), atol=1e-6)
    assert torch.allclose(got["stochastic_layerwise_recon"],
                          sum(kl({n: r[n]}) for r in R for n in r) / (2 * len(g)), atol=1e-6)
    last = spd.reconstruction_losses(s, t, target, g, R, ["recon"], last_token_only=True)
    assert torch.allclose(last["recon"], spd.kl_divergence(s(t, g)[:, -1], target[:, -1]), atol=1e-6)


def test_partial_subsets_are_random_nonempty():
    torch.manual_seed(0)
    names = ["a", "b", "c"]
    seen = {tuple(spd.random_layer_subset(names)) for _ in range(300)}
    assert len(seen) == 7 and () not in seen  # all 2^3 - 1 non-empty subsets occur
    many = [f"l{i}" for i in range(100)]      # more layers than bits in an int64
    assert 0 < len(spd.random_layer_subset(many)) <= 100
    counts = collections.Counter(tuple(spd.random_layer_subset(names)) for _ in range(7000))
    assert all(abs(c / 7000 - 1 / 7) < 0.02 for c in counts.values())   # uniform over the 7
    g = {n: torch.rand(1, 2, 3) for n in names}
    R = [{n: torch.rand(1, 2, 3) for n in names} for _ in range(3)]
    torch.manual_seed(1)
    drawn = [spd.random_layer_subset(names) for _ in range(4)]        # the draws the builders make
    assert len(drawn[0]) < 3 and len(drawn[1]) < 3                   # (proper subsets, so all layers fails)
    torch.manual_seed(1)
    (partial,) = spd.RECONSTRUCTIONS["partial_recon"](g, R)         # Eq. 5: one subset, masks g
    assert list(partial) == drawn[0] and all(partial[n] is g[n] for n in partial)
    torch.manual_seed(1)
    sets = spd.RECONSTRUCTIONS["stochastic_partial_recon"](g, R)    # Eq. 6: a subset per sample, r^(s)
    assert [list(m) for m in sets] == drawn[:3]
    assert all(m[n] is R[k][n] for k, m in enumerate(sets) for n in m)


# -----------------------------------------------------------------------------
# 6. training

@pytest.mark.parametrize("ci", ["scalar", "vector", "attention"])
def test_short_run_lowers_loss_and_keeps_target(ci):
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = spd.SPDModel(m, "blocks.*.attn.*", C=6, ci=ci, d_gate=4, max_seq_len=6)
    cfg = config_for(s, steps=60, lr=1e-2, log_every=1000, beta_partial_recon=1,
                     beta_stochastic_partial_recon=1, beta_layerwise_recon=1, last_token_only=False)
    gen = torch.Generator().manual_seed(0)
    batch = lambda: torch.randint(0, 11, (8, 6), generator=gen)
    torch.manual_seed(0)
    x = batch()
    first = spd.training_step(s, x, cfg, 0)[0].item()
    hist = spd.train(s, cfg, batch, log=lambda *a: None)
    torch.manual_seed(0)
    last = spd.training_step(s, x, cfg, 0)[0].item()
    assert last < 0.5 * first, (first, last)
    assert hist[-1]["faithfulness"] < hist[0]["faithfulness"]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    frozen = [(n.removeprefix("model.").replace(".target.", "."), p)
              for n, p in s.named_parameters() if not p.requires_grad]
    assert len(frozen) == len(before) and all(torch.equal(p, before[n]) for n, p in frozen)


def test_lr_schedule_and_p_annealing():
    cfg = spd.Config(steps=101, lr=1.0, lr_warmup=0.1, lr_schedule="cosine", p_start=0.9, p_final=0.1)
    assert spd.lr_at(cfg, 0) == pytest.approx(0.1) and spd.lr_at(cfg, 10) == pytest.approx(1.0)
    assert spd.lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert spd.lr_at(cfg, 55) == pytest.approx(math.cos(math.pi / 4))  # halfway: cos(π/4), not 0.5
    assert spd.minimality_p(cfg, 0) == 0.9 and spd.minimality_p(cfg, 100) == pytest.approx(0.1)
    assert spd.minimality_p(cfg, 50) == pytest.approx(0.5)
    assert spd.beta_minimality_at(cfg, 100) == 0.02                     # default: constant
    cfg = spd.Config(steps=101, beta_minimality=0.2, minimality_decay_from=0.5, beta_minimality_final=0.02)
    at = [spd.beta_minimality_at(cfg, t) for t in range(101)]
    assert at[:51] == [0.2] * 51 and at[75] == pytest.approx(0.11) and at[100] == pytest.approx(0.02)
    assert [spd.beta_minimality_at(cfg, torch.tensor(t)).item() for t in (0, 75, 100)] \
        == pytest.approx([at[0], at[75], at[100]])
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=4, ci="vector", d_gate=4)
    total, terms, _ = spd.training_step(s, torch.randint(0, 11, (2, 6)), cfg, 100)
    assert total.item() == pytest.approx(sum((0.02 if n == "minimality" else getattr(cfg, "beta_" + n))
                                             * v.item() for n, v in terms.items()), rel=1e-6)


# -----------------------------------------------------------------------------
# orthogonal projection (Sec. 5.2, in gpt2_facts.py)

def test_orthogonal_projection_properties():
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64)
    u, v = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    Wp = gpt2_facts.orthogonal_projection(W, u, v)
    uh, vh = u[0] / u.norm(), v[0] / v.norm()
    assert abs(uh @ Wp @ vh) < 1e-12                                      # the pair is gone
    x_perp = torch.randn(4, dtype=torch.float64)
    x_perp -= (x_perp @ vh) * vh
    assert torch.allclose(Wp @ x_perp, W @ x_perp)                       # inputs ⊥ v untouched
    y_perp = torch.randn(6, dtype=torch.float64)
    y_perp -= (y_perp @ uh) * uh
    assert torch.allclose(y_perp @ Wp, y_perp @ W)                       # outputs ⊥ u untouched
    assert torch.allclose(gpt2_facts.orthogonal_projection(Wp, u, v), Wp)  # idempotent
    assert torch.allclose(Wp, W - (uh @ W @ vh) * torch.outer(uh, vh))  # the dense formula
    with pytest.raises(spd.SPDError, match="u \\(k, d_out\\)"):
        gpt2_facts.orthogonal_projection(W, v, u)


def test_suppress_subcomponents_linear_and_conv1d_agree():
    lin, conv, a, b = linear_and_conv1d_twins()
    ea = gpt2_facts.suppress_subcomponents(lin, a, {"0": [1, 3]})
    eb = gpt2_facts.suppress_subcomponents(conv, b, {"0": [1, 3]})
    L = a.layers["0"]
    ref = gpt2_facts.orthogonal_projection(lin[0].weight, L.U[:, [1, 3]].T, L.V[[1, 3]])
    assert torch.allclose(ea[0].weight, ref) and torch.allclose(eb[0].weight.T, ref)
    x = torch.randn(2, 5)
    assert torch.allclose(ea(x), eb(x), atol=1e-6)
    assert torch.equal(conv[0].weight, lin[0].weight.T)  # the caller's models are untouched
    with pytest.raises(spd.SPDError, match="not a decomposed layer"):
        gpt2_facts.suppress_subcomponents(lin, a, {"1": [0]})
    assert torch.equal(gpt2_facts.suppress_subcomponents(lin, a, {"0": torch.tensor([1, 3])})[0].weight,
                       ea[0].weight)                                   # indices as a tensor
    for bad in [torch.tensor([1, 1]), [1.9]]:
        with pytest.raises(spd.SPDError, match="must be a list of distinct integers"):
            gpt2_facts.suppress_subcomponents(lin, a, {"0": bad})
    other = copy.deepcopy(lin)
    other[0].weight.data[0, 0] += 1
    with pytest.raises(spd.SPDError, match="not the one s decomposed"):
        gpt2_facts.suppress_subcomponents(other, a, {"0": [1]})
    with torch.no_grad():
        L.U[:, 2] = 0                                                  # a piece that writes nothing
    with pytest.raises(spd.SPDError, match="a direction is zero"):
        gpt2_facts.suppress_subcomponents(lin, a, {"0": [2]})
    C = a.layers["0"].V.shape[0]
    for bad in ([1, 1], [-1], [C], 3, [float("nan")], None, "12", [True]):  # (twice: out twice)
        with pytest.raises(spd.SPDError, match=f"must be a list of distinct integers in 0..{C - 1}"):
            gpt2_facts.suppress_subcomponents(lin, a, {"0": bad})
    lin64 = copy.deepcopy(lin).double()                                # a float64 copy: the same edit
    assert torch.allclose(gpt2_facts.suppress_subcomponents(lin64, a, {"0": [1, 3]})[0].weight,
                          ea[0].weight.double(), atol=1e-6)


def test_suppressing_a_tied_layer_edits_only_that_layer():
    """GPT-2's lm_head shares wte's weight: the edit must not reach the input embedding."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=30))
    assert model.lm_head.weight is model.transformer.wte.weight
    s = spd.SPDModel(model, "lm_head", C=8, ci="vector", d_gate=4)
    edited = gpt2_facts.suppress_subcomponents(model, s, {"lm_head": [0, 5]})
    assert torch.equal(edited.transformer.wte.weight, model.transformer.wte.weight)
    L = s.layers["lm_head"]
    ref = gpt2_facts.orthogonal_projection(model.lm_head.weight, L.U[:, [0, 5]].T, L.V[[0, 5]])
    assert torch.allclose(edited.lm_head.weight, ref)


# -----------------------------------------------------------------------------
# 7-8. save / load, measures, bad input

def test_save_load_roundtrip_and_mismatch(tmp_path):
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.q_proj", C=3, ci="attention", d_gate=4, max_seq_len=6)
    path = tmp_path / "spd.pt"

    @dataclasses.dataclass
    class MyConfig(spd.Config):                     # a field torch.load(weights_only=True) refuses
        out_dir: pathlib.Path = pathlib.Path("runs")
    import numpy as np
    spd.save(s, path, MyConfig(C=3, lr=np.float32(0.5), steps=np.int64(7)))
    s2, cfg = spd.load(path, m)
    assert cfg["C"] == 3 and cfg["out_dir"] == "runs" and (cfg["lr"], cfg["steps"]) == (0.5, 7)  # not '0.5'

    @dataclasses.dataclass
    class Tagged(spd.Config):                       # a field JSON cannot hold: refused, not its str
        tags: set = dataclasses.field(default_factory=lambda: {"a"})
    message = r"the config holds \{'a'\}, a set, which a saved file cannot hold"
    with pytest.raises(spd.SPDError, match=message):
        spd.save(s, tmp_path / "tagged.pt", Tagged(C=3))
    with pytest.raises(spd.SPDError, match=message):             # before training, not after it
        spd.train(s, Tagged(C=3, ci="attention", d_gate=4, steps=1), lambda: 1 / 0, log=None)
    assert not (tmp_path / "tagged.pt").exists()
    cfg = MyConfig(C=3)
    spd.save_checkpoint(str(tmp_path / "ckpt.pt"), s, spd.make_optimizer(s, cfg), cfg, 0, [])
    s4 = spd.SPDModel(m, "blocks.*.attn.q_proj", C=4, ci="attention", d_gate=4, max_seq_len=6)
    with pytest.raises(spd.SPDError, match="ckpt.pt was made by an SPDModel with C=3, not 4: build it as then"):
        spd.load_checkpoint(str(tmp_path / "ckpt.pt"), s4, spd.make_optimizer(s4, cfg), cfg)
    s5 = spd.SPDModel(m, "blocks.*.attn.*", C=3, ci="attention", d_gate=4, max_seq_len=6)
    with pytest.raises(spd.SPDError, match=re.escape("with patterns=[blocks.0.attn.q_proj, blocks.1.attn.q_proj], "
                                                     "not [blocks.0.attn.q_proj, blocks.0.attn.k_proj, "
                                                     "blocks.0.attn.v_proj, ... (8 in all)]: build it as then")):
        spd.load_checkpoint(str(tmp_path / "ckpt.pt"), s5, spd.make_optimizer(s5, cfg), cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)        # a spec that lies about C
    torch.save({**ckpt, "spec": s4.spec}, tmp_path / "lie.pt")
    with pytest.raises(spd.SPDError, match="lie.pt does not fit this decomposition .*size mismatch"):
        spd.load_checkpoint(str(tmp_path / "lie.pt"), s4, spd.make_optimizer(s4, cfg), cfg)
    assert spd.load_checkpoint(str(tmp_path / "ckpt.pt"), s, spd.make_optimizer(s, cfg), cfg)[0] == 0
    t = torch.randint(0, 11, (2, 6))
    _, inputs = s.target_forward(t)
    for (n, a), b in zip(s.causal_importance(inputs).items(), s2.causal_importance(inputs).values()):
        assert torch.equal(a, b)
    with pytest.raises(spd.SPDError, match="different target"):
        spd.load(path, tiny(seed=1))
    with pytest.raises(spd.SPDError, match="no decomposition there"):
        spd.load(tmp_path / "missing.pt", m)
    with pytest.raises(spd.SPDError, match="made for a different target: it decomposes 'blocks.0.attn.q_proj', "
                                           "which this model does not have"):   # (e.g. gpt2_facts' run)
        spd.load(path, nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(spd.SPDError, match="the decomposition's path must be a str or os.PathLike, got NoneType"):
        spd.load(None, m)
    with pytest.raises(spd.SPDError, match="a path must be a str or os.PathLike, got NoneType"):
        spd.save(s, None)
    s64, _ = spd.load(path, copy.deepcopy(m).double())   # the same target in float64: its U, V, γ
    assert all(p.dtype == torch.float64 for p in s64.trainable_parameters())
    for a, b in zip(s.trainable_parameters(), s64.trainable_parameters()):
        assert torch.equal(a.double(), b)
    with pytest.raises(spd.SPDError, match="different target"):
        spd.load(path, tiny(seed=1).double())
    half = spd.SPDModel(copy.deepcopy(m).bfloat16(), "blocks.*.attn.q_proj", C=3, ci="vector", d_gate=4)
    spd.save(half, tmp_path / "bf16.pt")                      # (numpy has no bfloat16: it once failed)
    assert spd.load(tmp_path / "bf16.pt", copy.deepcopy(m).bfloat16())[0].layers["blocks.0.attn.q_proj"].V.dtype \
        == torch.bfloat16


def test_format_1_files_and_unknown_keys_are_one_line_errors(tmp_path):
    """Files from before 227853f (format 1, a scalar/vector CI's MLPs under .ci.gamma.) are not
    read but named; a key this code does not know is an error, not silently left out."""
    m = tiny()
    s = spd.SPDModel(m, "blocks.0.attn.q_proj", C=3, ci="vector", d_gate=2)
    spd.save(s, str(tmp_path / "new.pt"))
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    old = {**ckpt, "format": 1, "state": {k.replace(".ci.", ".ci.gamma."): v for k, v in ckpt["state"].items()}}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(spd.SPDError, match=r"old.pt has format 1, this code reads 2; train one first"):
        spd.load(str(tmp_path / "old.pt"), m)
    ckpt["state"]["model.x"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(spd.SPDError, match="does not fit this code's decomposition: 'model.x' is extra or missing"):
        spd.load(str(tmp_path / "odd.pt"), m)
    del ckpt["state"]["model.x"], ckpt["state"][next(k for k in ckpt["state"] if k.endswith(".U"))]
    torch.save(ckpt, tmp_path / "short.pt")
    with pytest.raises(spd.SPDError, match=r"'model.blocks.0.attn.q_proj.U' is extra or missing"):
        spd.load(str(tmp_path / "short.pt"), m)


def test_bad_patterns_are_one_line_errors():
    m = tiny()
    with pytest.raises(spd.SPDError) as e:
        spd.SPDModel(m, "blocks.*.mlp", C=2)
    assert "matches no module" in str(e.value) and "blocks.0.attn.q_proj" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(spd.SPDError, match="cannot be decomposed"):
        spd.SPDModel(m, "blocks.*.attn", C=2)
    torch_layer = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    for p in ["0.self_attn.out_proj", "0.linear1"]:        # (an AttributeError on .weight deep inside)
        with pytest.raises(spd.SPDError, match=rf"matches '{p}', a \w+, which cannot be decomposed "
                                               r"\(only Linear/Conv1D that the model calls; torch's own"):
            spd.SPDModel(torch_layer, p, C=2)
    for empty in ["", ",", []]:       # no layers: the partial losses' subset draw would never end
        with pytest.raises(spd.SPDError, match="no module patterns"):
            spd.SPDModel(m, empty, C=2)
    with pytest.raises(spd.SPDError, match="unknown CI"):
        spd.SPDModel(m, "blocks.0.attn.q_proj", C=2, ci="mlp")
    s = spd.SPDModel(m, "blocks.0.attn.q_proj", C=2)
    t = torch.randint(0, 11, (2, 6))
    with pytest.raises(spd.SPDError, match="not decomposed"):
        s(t, {"blocks.0.attn.k_proj": torch.ones(2, 6, 2)})
    with pytest.raises(spd.SPDError, match="last dimension must be C = 2"):
        s(t, {"blocks.0.attn.q_proj": torch.ones(2, 6, 3)})
    for shape in [(2, 7, 2), (3, 6, 2), (6, 2)]:    # longer than x, another batch, no batch
        with pytest.raises(spd.SPDError, match=re.escape(f"mask has shape {shape}; masks are (B, S, C) = (2, 6, C)")):
            s.run_mask_sets(t, [{"blocks.0.attn.q_proj": torch.ones(2, 6, 2)}, {"blocks.0.attn.q_proj": torch.ones(shape)}])
    q = "blocks.0.attn.q_proj"
    for masks, message in [({q: torch.ones(2, 6, 2, device="meta")}, "is on meta, the decomposition on cpu"),
                           ({q: [[1.0, 1.0]] * 6}, "masks must be a dict"), ([torch.ones(2, 6, 2)], "masks must be a dict")]:
        with pytest.raises(spd.SPDError, match=re.escape(message)):
            s(t, masks)
    for masks, message in [({q: [1.0, 1.0]}, "mask for 'blocks.0.attn.q_proj' is a list; masks are tensors"),
                           ([torch.ones(2, 6, 2)], "masks must be a dict {layer name: alpha}, got a list")]:
        with pytest.raises(spd.SPDError, match=re.escape(message)):
            with s.masked(masks):
                pass
    alpha = torch.rand(2, 6, 2) > 0.5                  # other dtypes are cast: bool, float64, float32
    expect = s(t, {q: alpha.float()})
    assert torch.equal(s(t, {q: alpha}), expect) and torch.allclose(s(t, {q: alpha.double()}), expect)
    s64 = spd.SPDModel(copy.deepcopy(m).double(), q, C=2)
    assert s64(t, {q: alpha.float()}).dtype == torch.float64
    assert torch.equal(s(t), m(t))  # a failed call leaves no mask behind


def test_api_numpy_sizes_other_outputs_and_bad_tokens(tmp_path):
    """numpy's integers as C and d_gate are stored as ints (a saved file loads; weights_only refuses
    numpy scalars); a model that returns a tuple, a dict or the final position's logits only, and
    tokens that are not a (B, S) tensor, are one-line errors."""
    import numpy as np
    m = tiny()
    s = spd.SPDModel(m, "blocks.0.attn.q_proj", C=np.int64(2), ci="vector", d_gate=np.int32(2))
    assert type(s.spec["C"]) is int and type(s.spec["d_gate"]) is int
    spd.save(s, tmp_path / "np.pt", config_for(s))
    assert spd.load(str(tmp_path / "np.pt"), m)[0].spec == s.spec

    class Returns(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.m, self.how = tiny(), how

        def forward(self, t):
            y = self.m(t)
            return {"tuple": (y, None), "dict": {"logits": y}, "final": y[:, -1]}[self.how]
    x = torch.randint(0, 11, (2, 6))
    for how, got in [("tuple", "a tuple"), ("dict", "a dict"), ("final", "a tensor (2, 11)")]:
        r = spd.SPDModel(Returns(how), "m.blocks.0.attn.q_proj", C=2, ci="vector", d_gate=2)
        with pytest.raises(spd.SPDError, match=re.escape(f"the model returned {got}; SPDModel needs logits "
                                                         f"(B, S, vocab), or an object with .logits")):
            spd.train(r, config_for(r, steps=1), lambda: x, log=lambda *a: None)
    for bad, got in [(x.tolist(), "list"), (x[0], "(6,)"), (x[:0], "(0, 6)")]:
        with pytest.raises(spd.SPDError, match=re.escape(f"causal_importances needs tokens (B, S) as a tensor, "
                                                         f"B, S >= 1; got {got}")):
            spd.causal_importances(s, bad)
    long = torch.randint(0, 11, (2, 9))                        # tiny() has 8 positions
    with pytest.raises(spd.SPDError, match=re.escape("sequences of 9 positions, but this SPDModel was "
                                                     "built with max_seq_len=8: pass shorter ones")):
        spd.causal_importances(spd.SPDModel(m, "blocks.0.attn.q_proj", C=2, max_seq_len=8), long)
    for ci in ("vector", "attention"):                          # (the target's own one-line error)
        t = induction.InductionTransformer(vocab_size=8, max_seq_len=8)
        s = spd.SPDModel(t, "blocks.0.attn.q_proj", C=2, ci=ci, max_seq_len=16)
        with pytest.raises(spd.SPDError, match="sequences of 9 tokens; this model has 8 positions"):
            spd.causal_importances(s, long % 10)                 # (tokens it has: vocab_size + 2)


def test_bad_api_input_is_a_one_line_error(tmp_path):
    """Through the API too (the scripts check their flags first): C or d_gate below 1, a Config
    out of range given to train, and save onto a folder, which is left as it was."""
    m = tiny()
    for C, d_gate, S, causal in [(0, 4, None, True), (2, 0, None, True), (2.5, 4, None, True), ("4", 4, None, True),
                                 (2, 4, 6.0, True), (2, 4, -3, True), (2, 4, None, "false"), (10**19, 4, None, True)]:
        with pytest.raises(spd.SPDError, match=re.escape(
                f"must be integers >= 1 (and < 2**31) and causal a bool, got C={C!r}, d_gate={d_gate!r}, "
                f"max_seq_len={S!r}, causal={causal!r}")):
            spd.SPDModel(m, "blocks.0.attn.q_proj", C=C, d_gate=d_gate, max_seq_len=S, ci="attention",
                         causal=causal)
    with pytest.raises(spd.SPDError, match=r"the attention CI needs max_seq_len \(the longest sequence"):
        spd.SPDModel(m, "blocks.0.attn.q_proj", C=2, d_gate=2, ci="attention")
    s = spd.SPDModel(m, "blocks.0.attn.q_proj", C=2, ci="vector", d_gate=2)
    before = [p.clone() for p in s.trainable_parameters()]
    for bad, message in [(dict(lr=-1e-3), "--lr=-0.001 is out of range: it must be > 0 and finite"),
                         (dict(steps=0), "--steps=0 is out of range: it must be >= 1"),
                         (dict(optimizer="sgd"), "--optimizer=sgd is out of range: it must be one of adam, adamw")]:
        with pytest.raises(spd.SPDError, match=re.escape(message)):
            spd.train(s, config_for(s, **bad), lambda: torch.randint(0, 11, (2, 6)), log=None)
    assert all(torch.equal(a, b) for a, b in zip(before, s.trainable_parameters()))
    x, cfg = torch.randint(0, 11, (4, 6)), config_for(s, steps=2, log_every=1)
    pad = torch.ones(4, 6)
    pad[0, -1] = 0                                           # right padding: no final token to train
    nan = torch.ones(4, 6)
    nan[1, 2] = math.nan
    tokens = "it must give tokens, a tensor (B, S, ...) with B, S >= 1, or (tokens, weight)"
    shape = "weight must be a tensor (B, S), as the tokens' first two dimensions"
    values = "weight must be >= 0 (no NaN) and not all 0"
    for batch, why in [(torch.zeros(0, 6, dtype=torch.long), tokens), (x[0], tokens), ((x,), tokens),
                       (None, tokens), ((x, x, x), tokens), ({"x": x}, tokens), ((x, torch.ones(6)), shape),
                       ((x, torch.ones(4)), shape), ((x, [1] * 6), shape), ((x, torch.zeros(4, 6)), values),
                       ((x, -torch.ones(4, 6)), values), ((x, nan), values),
                       ((x, pad), "with last_token_only, weight must be > 0 at every final position (pad on "
                                  "the left)")]:
        with pytest.raises(spd.SPDError, match=r"next_batch\(\) gave x .*, weight .*: " + re.escape(why) + "$"):
            spd.train(s, cfg, lambda: batch, log=lambda *a: None)
    spd.train(s, dataclasses.replace(cfg, last_token_only=False), lambda: [x, pad], log=lambda *a: None)
    batches = iter([x, x, (x, pad)])                           # a bad batch later in the run, too
    with pytest.raises(spd.SPDError, match=r"next_batch\(\) gave x \(4, 6\), weight \(4, 6\)"):
        spd.train(s, config_for(s, steps=3), lambda: next(batches), log=lambda *a: None)
    for bad, message in [(dict(faithfulness_warmup_steps=3, faithfulness_warmup_lr=1e30),
                          r"the faithfulness warm-up ended at L_faithful (nan|inf); stopped, nothing "
                          r"saved; try a lower --faithfulness_warmup_lr"),
                         (dict(lr=1e30), r"step 0: after its update L_faithful is (nan|inf) or a "
                                         r"parameter is not finite; stopped, nothing saved; try a lower --lr")]:
        with pytest.raises(spd.SPDError, match=message):       # (no result, and no wrong advice)
            spd.train(copy.deepcopy(s), config_for(s, steps=1, **bad), lambda: x, log=lambda *a: None)
    for bad in [dict(data_rng=0), dict(checkpoint=str(tmp_path))]:
        with pytest.raises(spd.SPDError, match="checkpoint must be a file's path and data_rng a torch.Generator"):
            spd.train(s, cfg, lambda: x, log=lambda *a: None, **bad)
    with pytest.raises(spd.SPDError, match="at least one layer"):
        spd.random_layer_subset([])                            # (it would draw forever)
    for bad, message in [(dict(resume="false"), "--resume='false' is a str; it must be a bool"),
                         (dict(steps=2.0), "--steps=2.0 is a float; it must be an int"),
                         (dict(steps=True), "--steps=True is a bool; it must be an int"),
                         (dict(resume=1), "--resume=1 is an int; it must be a bool"),
                         (dict(C=3), "--C=3 but the SPDModel was built with 2: build it with the "
                                     "config's C, ci, d_gate and causal=ci_causal, or set C=2"),
                         (dict(ci_causal=False), "--ci_causal=False but the SPDModel was built with True")]:
        with pytest.raises(spd.SPDError, match=re.escape(message)):
            spd.train(s, dataclasses.replace(cfg, **bad), lambda: x, log=lambda *a: None)
    import numpy as np                                         # numpy's numbers are numbers; an int
    spd.check_config(dataclasses.replace(cfg, steps=np.int64(2), lr=np.float32(1e-3), beta_recon=1))
    assert gpt2_facts.parse_config(["--beta_partial_recon=0.5"]).beta_partial_recon == 0.5  # preset: 10
    wide = nn.Sequential(nn.Linear(4, 4)).double()           # U, V and γ take the target's dtype
    s64 = spd.SPDModel(wide, "0", C=2, ci="attention", d_gate=2, max_seq_len=5)
    assert all(p.dtype == torch.float64 for p in s64.trainable_parameters())
    spd.train(s64, config_for(s64, steps=1, last_token_only=False), lambda: torch.randn(2, 5, 4,
              dtype=torch.float64), log=lambda *a: None)
    with pytest.raises(spd.SPDError, match="unknown optimizer 'sgd'"):
        spd.make_optimizer(s, spd.Config(optimizer="sgd"))     # (called without train's check)
    spd.train(s, dataclasses.replace(cfg, device="cuda:7"), lambda: x, log=lambda *a: None)  # unread
    (tmp_path / "spd.pt").mkdir()
    (tmp_path / "spd.pt" / "keep").write_text("x")
    with pytest.raises(spd.SPDError, match="spd.pt is a folder: give a file name"):
        spd.save(s, str(tmp_path / "spd.pt"))
    assert os.listdir(tmp_path) == ["spd.pt"] and (tmp_path / "spd.pt" / "keep").read_text() == "x"


def test_measures():
    g = {"a": torch.tensor([[[0.0, 0.5, 0.2], [0.05, 0.0, 0.0]]])}
    assert spd.mean_l0(g, threshold=0.1)["a"].item() == pytest.approx(1.0)
    assert spd.mean_l0(g)["a"].item() == pytest.approx(1.5)                 # g > 0: zeros do not count
    assert spd.mean_l0(g, torch.tensor([[1.0, 3.0]]))["a"].item() == pytest.approx((2 + 3) / 4)
    for w in [torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 3.0]]).expand(4, 2)]:  # broadcast, B 4
        assert spd.mean_l0({"a": g["a"].expand(4, 2, 3)}, w)["a"].item() == pytest.approx((2 + 3) / 4)


# -----------------------------------------------------------------------------
# gpt2_facts.py (offline: the tiny model; nothing here reaches the network)

HERE = os.path.dirname(os.path.abspath(__file__))


def test_gpt2_random_skips_the_analyses(tmp_path, monkeypatch, capsys):
    """Random weights: speed and memory only (GPT-2-small shapes shrunk to one narrow layer here)."""
    monkeypatch.setattr(gpt2_facts, "GPT2Config",
                        lambda **kw: GPT2Config(**kw, n_layer=1, n_embd=16, n_head=2, n_positions=32))
    res = gpt2_facts.main(["--model=gpt2-random", "--preset=tiny", "--steps=2", "--C=4", "--d_gate=2",
                           "--save=false", "--threads=1", f"--out_dir={tmp_path}",
                           "--ci_causal=false"])             # (reaches the SPDModel: train checks)
    printed = capsys.readouterr().out
    assert "the analyses would measure nothing, so they are skipped" in printed
    assert "no matplotlib" not in printed and "zero_mlp" not in res
    assert res["training"]["steps"] == 2 and "suppression" not in res and "claim" not in res
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))


def test_facts_ctrl_c_then_resume(tmp_path, monkeypatch, capsys, ctrl_c_fails):
    """Ctrl-C while gpt2_facts trains saves a checkpoint; --resume=true finishes the run, writes
    results.json and spd.pt, and deletes the checkpoint (results.json holds the run)."""
    import signal
    monkeypatch.setattr(gpt2_facts, "GPT2Config",
                        lambda **kw: GPT2Config(**kw, n_layer=1, n_embd=16, n_head=2, n_positions=32))
    step, calls = spd.training_step, []

    def interrupted(*a, **kw):                     # calls 1-3: gpt2_facts' timing; 4: step 0
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)      # Ctrl-C during step 1
        return step(*a, **kw)
    monkeypatch.setattr(spd, "training_step", interrupted)
    argv = ["--model=gpt2-random", "--preset=tiny", "--steps=4", "--C=4", "--d_gate=2", "--log_every=1",
            "--threads=1", f"--out_dir={tmp_path}", "--ci_causal=false"]
    with pytest.raises(SystemExit):
        gpt2_facts.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    said = re.fullmatch(r"error: interrupted after step 1; saved .*checkpoint.pt: continue with: "
                        r"python gpt2_facts.py (.*)", err[0]) if len(err) == 1 else None
    assert said and shlex.split(said[1]) == argv + ["--resume=true"], err   # the command to type
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "results.json").exists()
    steps = []
    monkeypatch.setattr(spd, "training_step", lambda *a, **kw: steps.append(a[3]) or step(*a, **kw))
    res = gpt2_facts.main(shlex.split(said[1]))
    assert [row["step"] for row in res["training"]["history"]] == [0, 1, 2, 3]
    assert [t for t in steps if t] == [2, 3]                 # steps 2 and 3 (0: the timing's)
    assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / "spd.pt").exists()
    assert json.loads((tmp_path / "results.json").read_text())["training"]["steps"] == 4


def test_tiny_end_to_end_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a smaller target than the 4-layer d_model 64 one (that trains in ~40 s): the same data and
    # tokenizer, 2 layers of width 32 at lr 1e-2, ~8 s; the cache records the config it was made with
    small = {**gpt2_facts.TINY_CONFIG, "n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 128}
    monkeypatch.setattr(gpt2_facts, "TINY_CONFIG", small)
    monkeypatch.setattr(gpt2_facts, "train_tiny", functools.partial(gpt2_facts.train_tiny, lr=1e-2))
    out_dir, tiny_path = tmp_path / "out", tmp_path / "cache" / "tiny.pt"
    res = gpt2_facts.main(["--model=tiny", "--steps=20", "--log_every=10", "--threads=1", "--device=cpu",
                           f"--out_dir={out_dir}", f"--tiny_path={tiny_path}"])
    printed = capsys.readouterr().out
    for k in range(0, 7):                                       # analyses 0-6, and 1b
        assert f"\n({k}) " in printed, f"analysis ({k}) not printed"
    assert "\n(1b) " in printed
    assert tiny_path.exists() and (out_dir / "spd.pt").exists()

    # results.json holds what main returned (up to JSON's tuples -> lists)
    with open(out_dir / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert set(saved) == {"config", "model", "tokens", "target_check", "training", "active",
                          "unique_layer0_mlp", "suppression", "fact_set", "names", "reversed",
                          "zero_mlp", "causal_trace", "claim", "where", "wall_seconds"}
    cfg = saved["config"]
    assert (cfg["model"], cfg["preset"], cfg["steps"], cfg["C"]) == ("tiny", "tiny", 20, 64)
    assert saved["model"]["name"] == "tiny" and saved["model"]["threads"] == 1
    n_layer = gpt2_facts.TINY_CONFIG["n_layer"]
    layers = [f"transformer.h.{i}.{m}" for i in range(n_layer)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    tokens = saved["tokens"]                                    # sub-word: the names in pieces
    tokenizer = gpt2_facts.SubwordTokenizer()
    assert tokens == [tokenizer.tokenize(f) for f in gpt2_facts.ATHLETE_FACTS]
    assert [t[:4] for t in tokens] == [["K", "obe", " Bry", "ant"], ["T", "iger", " Wo", "ods"]]
    tc = saved["target_check"]
    assert len(tc["P(basketball)"]) == len(tc["P(golf)"]) == 2 and tc["correct"] == [True, True]
    assert tc["argmax"] == [" " + s for s in gpt2_facts.SPORTS]

    # training: history at steps 0, 10 and the last, the file saved
    tr = saved["training"]
    assert tr["steps"] == 20 and [h["step"] for h in tr["history"]] == [0, 10, 19]
    assert tr["saved"] == os.path.join(str(out_dir), "spd.pt")
    assert tr["final"] == tr["history"][-1] and set(tr["final"]["L0"]) == set(layers)
    assert tr["trainable_parameters"] > 0 and tr["peak_gpu_memory_gib"] is None

    # (1) active subcomponents per layer and token; totals add up
    act = saved["active"]
    assert act["threshold"] == 0.0 and list(act["per_layer"]) == layers   # block by block
    for name, v in act["per_layer"].items():
        assert [len(row) for row in v["per_token"]] == [len(t) for t in tokens]
        assert all(isinstance(c, int) and 0 <= c <= v["total"] for row in v["per_token"] for c in row)
        assert max(max(row) for row in v["per_token"]) <= v["total"] <= 64
        assert len(v["only_in"]) == 2 and sum(v["only_in"]) <= v["total"]
    assert isinstance(act["total"], int)
    assert act["total"] == sum(v["total"] for v in act["per_layer"].values())
    assert act["only_in"] == [sum(v["only_in"][b] for v in act["per_layer"].values()) for b in range(2)]

    # (1b) unique layer-0 MLP subcomponents at each name token
    edit_layers = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    uniq = saved["unique_layer0_mlp"]
    assert list(uniq) == ["Kobe Bryant", "Tiger Woods"]
    for (first_tok, last_tok), u in zip([("obe", "ant"), ("iger", "ods")], uniq.values()):
        assert list(u) == [first_tok, last_tok]                 # each name's last piece
        assert u[first_tok]["kind"] == "first" and u[first_tok]["position"] == 1
        assert u[last_tok]["kind"] == "last" and u[last_tok]["position"] == 3
        for e in u.values():
            assert list(e["unique"]) == edit_layers
            assert all(0 <= c < 64 for cs in e["unique"].values() for c in cs)

    # (2) suppression: before and after probabilities on both prompts, the chosen directions
    sup = saved["suppression"]
    assert set(sup) == {"before", "basketball", "golf"}
    assert sup["before"] == [[tc["P(basketball)"][b], tc["P(golf)"][b]] for b in range(2)]
    for b, sport in enumerate(gpt2_facts.SPORTS):
        first, last = gpt2_facts.ATHLETES[b]
        u = list(uniq[f"{first} {last}"].values())
        assert sup[sport]["chosen"] == gpt2_facts.merge(u[0]["unique"], u[1]["unique"])
        assert sup[sport]["n_directions"] == sum(map(len, sup[sport]["chosen"].values()))
        after = sup[sport]["after"]
        assert len(after) == 2 and all(len(r) == 2 and all(0 <= p <= 1 for p in r) for r in after)

    # (3) the fact-set effect (Figure 3): 100 facts, and the tiny model's 126 other athletes
    assert set(saved["fact_set"]) == {"basketball", "golf"}
    more = gpt2_facts.TINY_ATHLETE_FACTS[2:]
    assert len(more) == 126
    model, _ = gpt2_facts.load_model("tiny", "cpu", str(tiny_path))
    P_more = gpt2_facts.final_word_probs(model, tokenizer, more)
    for b, (sport, e) in enumerate(saved["fact_set"].items()):
        assert e["more_athletes_mean_before"] == pytest.approx(P_more.mean().item(), abs=1e-6)
        assert e["selective"] == (e["target_after"] <= e["target_before"] / 5
                                  and abs(e["other_athlete_after"] - e["other_athlete_before"]) <= 0.05
                                  and abs(e["facts_mean_after"] - e["facts_mean_before"]) <= 0.05)
        assert e["target"] == gpt2_facts.ATHLETE_FACTS[b]
        assert len(e["facts_before"]) == len(e["facts_after"]) == 100
        assert e["facts_mean_before"] == pytest.approx(sum(e["facts_before"]) / 100)
        assert e["facts_mean_after"] == pytest.approx(sum(e["facts_after"]) / 100)
        assert e["target_before"] == pytest.approx(sup["before"][b][b])
        assert e["target_after"] == pytest.approx(sup[sport]["after"][b][b])
        assert e["other_athlete_before"] == pytest.approx(sup["before"][1 - b][1 - b])
        assert e["other_athlete_after"] == pytest.approx(sup[sport]["after"][1 - b][1 - b])
        assert e["others_max_drop_fact"] in gpt2_facts.ATHLETE_FACTS + gpt2_facts.FACTS
        assert isinstance(e["selective"], bool)

    # (4) names (Figure 4): first name alone, last name alone, both
    names = saved["names"]
    assert list(names) == ["Kobe Bryant", "Tiger Woods"]
    for b, (athlete, n) in enumerate(names.items()):
        first, last = gpt2_facts.ATHLETES[b]
        assert (n["sport"], n["first_token"], n["last_token"]) == (gpt2_facts.SPORTS[b], *list(uniq[athlete]))
        for k in ("none", "first", "last", "both"):
            assert 0 <= n[k] <= 1
        assert n["none"] == pytest.approx(sup["before"][b][b])
        assert n["both"] == pytest.approx(sup[n["sport"]]["after"][b][b])  # the same edit
        nd = n["n_directions"]
        assert nd["none"] == 0 and nd["both"] == sup[n["sport"]]["n_directions"]
        assert nd["both"] <= nd["first"] + nd["last"]

    # (5) the reversed prompt
    rev = saved["reversed"]
    assert (rev["prompt"], rev["target"]) == (gpt2_facts.REVERSED_PROMPT, "Tiger Woods")
    assert 0 <= rev["before"] <= 1 and 0 <= rev["after"] <= 1
    assert rev["greedy_before"] == " Tiger Woods"        # the tiny model learned it
    assert rev["still_answers"] == (rev["greedy_after"] == " Tiger Woods")
    # P(" Tiger Woods") = P(" T") P("iger") P(" Wo") P("ods"), each from its own prompt
    prompt, pieces = gpt2_facts.REVERSED_PROMPT, [" T", "iger", " Wo", "ods"]
    steps = [gpt2_facts.last_logits(model, tokenizer, [prompt + "".join(pieces[:k])]).softmax(-1)[0]
             for k in range(4)]
    assert rev["before"] == pytest.approx(math.prod(p[tokenizer.ids[t]].item() for p, t in zip(steps, pieces)),
                                          rel=1e-5)

    # (0) one MLP zeroed at a time (Figure 9), before SPD: one entry per layer; (6) the verdict
    z = saved["zero_mlp"]
    assert z["full"]["P(sport)"] == [sup["before"][0][0], sup["before"][1][1]] and len(z["layers"]) == n_layer
    assert all(0 <= p <= 1 for r in z["layers"] for p in r["P(sport)"] + [r["facts_mean"]])
    assert printed.index("\n(0) ") < printed.index("preset tiny")       # before the decomposition
    # (0b) causal tracing (Figures 7-8), before SPD: per athlete three (tokens x layers) grids
    ct = saved["causal_trace"]
    assert (ct["samples"], ct["window"]) == (10, 1) and ct["noise_std"] > 0
    assert printed.index("\n(0b) ") < printed.index("preset tiny")
    for b, (first, last) in enumerate(gpt2_facts.ATHLETES):
        r = ct[f"{first} {last}"]
        assert r["tokens"] == tokens[b][:-1] and r["clean"] == pytest.approx(z["full"]["P(sport)"][b], abs=1e-6)
        assert r["corrupted"] < r["clean"] / 2                           # the noise hides the name
        for kind in ("hidden", "mlp", "attn"):
            assert len(r[kind]) == len(r["tokens"]) and {len(row) for row in r[kind]} == {n_layer}
        assert r["hidden"][-1][-1] == pytest.approx(r["clean"], abs=1e-6)   # the last state at the end
        assert r["hidden"][0][-1] == pytest.approx(r["corrupted"], abs=1e-6)
        half = (r["clean"] - r["corrupted"]) / 2
        assert r["half"] == [l for l in range(n_layer) if r["mlp"][3][l] - r["corrupted"] >= half]
    claim = saved["claim"]
    assert claim == {"holds": claim["basketball"] and claim["golf"] and claim["reversed"],
                     "basketball": saved["fact_set"]["basketball"]["selective"],
                     "golf": saved["fact_set"]["golf"]["selective"], "reversed": rev["still_answers"]}

    # (7) where the facts are: (a) zeroing at the name tokens, (b) (1b) in each matrix, (c) all active
    where = saved["where"]
    za = where["zeroed_at_names"]
    assert list(za) == ["none"] + [f"h.{i}.{p}" for i in range(n_layer) for p in ("attn", "mlp")]
    assert za["none"]["P(sport)"] == pytest.approx([sup["before"][0][0], sup["before"][1][1]], abs=1e-6)
    assert za["none"]["more_athletes_mean"] == pytest.approx(P_more.mean().item(), abs=1e-6)
    last = f"h.{n_layer - 1}"                 # the last block's output at the names reaches no prediction
    assert za[f"{last}.mlp"]["P(sport)"] == pytest.approx(za["none"]["P(sport)"], abs=1e-6)
    assert za[f"{last}.attn"]["P(sport)"] == pytest.approx(za["none"]["P(sport)"], abs=1e-6)
    up = where["unique_per_matrix"]
    assert list(up) == layers + ["all"]
    for b, sport in enumerate(gpt2_facts.SPORTS):
        assert up["all"][b]["n"] == sum(up[n][b]["n"] for n in layers)
        assert sum(up[n][b]["n"] for n in edit_layers) == sup[sport]["n_directions"]
        assert up["transformer.h.0.mlp.c_fc"][b]["n"] == len(sup[sport]["chosen"].get("transformer.h.0.mlp.c_fc", []))
        e = where["all_active_at_names"][b]           # a superset of the (1b) directions
        assert e["n"] >= sup[sport]["n_directions"] and 0 <= e["facts_mean"] <= 1

    # the saved decomposition reloads on the cached target and reproduces the results
    model, tokenizer = gpt2_facts.load_model("tiny", "cpu", str(tiny_path))
    assert "training tiny" not in capsys.readouterr().out   # the cache was used, no retraining
    s, saved_cfg = spd.load(str(out_dir / "spd.pt"), model)
    assert saved_cfg["C"] == 64 and saved_cfg["steps"] == 20 and set(s.layers) == set(layers)
    x, valid = gpt2_facts.make_batch(tokenizer, gpt2_facts.ATHLETE_FACTS)
    g = spd.causal_importances(s, x)
    g = {n: g[n] for n, _ in model.named_modules() if n in g}      # block by block, as run does
    on = gpt2_facts.activity(g, valid.float(), act["threshold"])
    again = gpt2_facts.report_active(on, tokens, act["threshold"])
    assert again["total"] == act["total"] and again["only_in"] == act["only_in"]
    assert list(again["per_layer"]) == layers
    assert json.loads(json.dumps(again["per_layer"])) == act["per_layer"]
    for sport in gpt2_facts.SPORTS:
        P = gpt2_facts.athlete_probs(gpt2_facts.suppress(model, s, sup[sport]["chosen"]), tokenizer)
        assert sum(P, []) == pytest.approx(sum(sup[sport]["after"], []), abs=1e-6)


def gpt2_written_out(model, x, eps, patch):
    """GPT-2's logits written out from its weights, eps (R, n, d) added to the first n token
    embeddings of x (1, S); patch(j, part, t) returns block j's "attn" / "mlp" output or its
    "hidden" output, maybe changed: the reference for causal tracing's hooks."""
    tr, (R, n, d), S, nh = model.transformer, eps.shape, x.shape[1], model.config.n_head
    h = tr.wte.weight[x].expand(R, S, d).clone()
    h[:, :n] += eps
    h = h + tr.wpe.weight[:S]
    later = torch.ones(S, S, dtype=torch.bool).triu(1)
    for j, blk in enumerate(tr.h):
        qkv = blk.ln_1(h) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias        # Conv1D: x W + b
        q, k, v = (t.view(R, S, nh, d // nh).transpose(1, 2) for t in qkv.split(d, -1))
        w = (q @ k.transpose(-1, -2) / math.sqrt(d // nh)).masked_fill(later, -math.inf).softmax(-1)
        a = (w @ v).transpose(1, 2).reshape(R, S, d) @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        h = h + patch(j, "attn", a)
        m = F.gelu(blk.ln_2(h) @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias, approximate="tanh")
        h = h + patch(j, "mlp", m @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias)
        h = patch(j, "hidden", h)
    return model.lm_head(tr.ln_f(h))                                               # (R, S, vocab)


@torch.no_grad()
def test_causal_trace_matches_gpt2_written_out():
    """Figures 7-8: every cell of causal_trace (hooks on the model) equals the same restoration in
    GPT-2 written out by hand, for each kind and a few windows; float64, a random GPT-2 with
    large weights so that the noise and the restorations move P."""
    torch.manual_seed(0)
    tok = gpt2_facts.SubwordTokenizer()
    config = GPT2Config(vocab_size=len(tok), n_layer=3, n_embd=32, n_head=2, n_inner=64, n_positions=32,
                        initializer_range=0.3, bos_token_id=None, eos_token_id=None, **gpt2_facts.NO_DROPOUT)
    model = GPT2LMHeadModel(config).eval().double()
    prompt, target = gpt2_facts.split_prompt(tok, gpt2_facts.ATHLETE_FACTS[0])
    n, S, L = 4, len(prompt), 3                                    # "K|obe| Bry|ant"
    x, eps = torch.tensor([prompt]), 0.5 * torch.randn(3, n, 32, dtype=torch.float64)
    clean = {}

    def keep(j, part, t):
        clean[(j, part)] = t[0]
        return t
    P = lambda noise, patch: gpt2_written_out(model, x, noise, patch)[:, -1].softmax(-1)[:, target].mean().item()
    p_clean, p_corrupted = P(torch.zeros(1, n, 32, dtype=torch.float64), keep), P(eps, lambda j, part, t: t)
    assert p_clean == pytest.approx(gpt2_facts.final_word_probs(model, tok, gpt2_facts.ATHLETE_FACTS[:1]).item(), rel=1e-12)
    assert abs(p_corrupted - p_clean) > 0.5 * p_clean                        # the noise matters here
    for kind, window in [("hidden", 1), ("hidden", 3), ("mlp", 1), ("mlp", 2), ("attn", 3), ("attn", 10)]:
        got_clean, got_corrupted, grid = gpt2_facts.causal_trace(model, prompt, target, eps, kind, window)
        assert (got_clean, got_corrupted) == (pytest.approx(p_clean, rel=1e-12), pytest.approx(p_corrupted, rel=1e-12))
        assert grid.shape == (S, L)
        for l in range(L):
            lo, hi = (l, l + 1) if kind == "hidden" else (max(0, l - window // 2), min(L, l - window // 2 + window))
            for i in range(S):
                def restore(j, part, t):
                    if part != kind or not lo <= j < hi:
                        return t
                    t = t.clone()
                    t[:, i] = clean[(j, part)][i]
                    return t
                assert grid[i, l].item() == pytest.approx(P(eps, restore), rel=1e-12), (kind, window, i, l)
        assert grid.std() > 0.05 * grid.mean()                               # the cells differ
        if kind == "hidden":          # the last block's output reaches the final logits at its token only
            assert grid[-1, -1] == pytest.approx(p_clean, rel=1e-12)
            assert grid[:-1, -1].tolist() == pytest.approx([p_corrupted] * (S - 1), rel=1e-12)


def test_report_causal_trace_passes_its_settings_and_reads_half_at_the_name(monkeypatch, capsys):
    """report_causal_trace's wiring, with causal_trace replaced by a fake that records its
    arguments: the noise is trace_noise x the std of the facts' token embeddings, drawn from a
    generator seeded with --seed, on the name's tokens only; the window is --trace_window; each
    kind's grid lands under its own name; "half" reads the MLP row of the name's last token."""
    tok = gpt2_facts.SubwordTokenizer()
    config = GPT2Config(vocab_size=len(tok), n_layer=4, n_embd=16, n_head=2, n_positions=32,
                        bos_token_id=None, eos_token_id=None, **gpt2_facts.NO_DROPOUT)
    model = GPT2LMHeadModel(config).eval()
    cfg = gpt2_facts.parse_config(["--model=tiny", "--trace_window=3", "--trace_noise=2.5", "--seed=4"])
    calls = []

    def fake(model, prompt, target, eps, kind, window=10):
        calls.append((prompt, target, eps.clone(), kind, window))
        grid = torch.full((len(prompt), 4), {"hidden": 0.3, "mlp": 0.1, "attn": 0.2}[kind])
        if kind == "mlp":
            grid[3] = torch.tensor([0.2, 0.7, 0.4, 0.9])        # the name's last piece ("ant", "ods")
            grid[-1] = torch.tensor([0.9, 0.2, 0.9, 0.2])       # the final token: not read
        return 0.9, 0.1, grid
    monkeypatch.setattr(gpt2_facts, "causal_trace", fake)
    out = gpt2_facts.report_causal_trace(model, tok, cfg)
    ids = sorted({i for f in gpt2_facts.ATHLETE_FACTS + gpt2_facts.FACTS for i in tok.encode(f)})
    sigma = model.transformer.wte.weight[ids].std().item()
    gen = torch.Generator().manual_seed(4)
    assert out["noise_std"] == pytest.approx(2.5 * sigma) and (out["samples"], out["window"]) == (10, 3)
    for b, (first, last) in enumerate(gpt2_facts.ATHLETES):
        eps = 2.5 * sigma * torch.randn(10, 4, 16, generator=gen)              # the name: 4 pieces
        mine = calls[3 * b: 3 * b + 3]
        assert [c[3] for c in mine] == ["hidden", "mlp", "attn"] and {c[4] for c in mine} == {3}
        assert all(c[:2] == gpt2_facts.split_prompt(tok, gpt2_facts.ATHLETE_FACTS[b]) for c in mine)
        assert all(torch.allclose(c[2], eps) for c in mine)                    # one draw for all kinds
        r = out[f"{first} {last}"]
        assert (r["clean"], r["corrupted"]) == (0.9, 0.1) and r["attn"][0][0] == pytest.approx(0.2)
        assert r["hidden"][0][0] == pytest.approx(0.3) and r["half"] == [1, 3]   # >= 0.1 + 0.8 / 2
    assert "brings back half at layers [1, 3]" in capsys.readouterr().out


def test_tiny_tokenizer_splits_names_into_shared_pieces():
    tok = gpt2_facts.SubwordTokenizer()
    # GPT-2-like pre-split (leading spaces on the words), frequent words whole, names in pieces
    assert tok.tokenize("Kobe Bryant plays the sport of basketball") == \
        ["K", "obe", " Bry", "ant", " plays", " the", " sport", " of", " basketball"]
    assert tok.tokenize(" is Tiger Woods") == [" is", " T", "iger", " Wo", "ods"]
    # every athlete name is exactly its four pieces, and no name is a token of its own
    pieces = {}
    for (f1, f2), (l1, l2), sport in gpt2_facts.TINY_ATHLETES:
        name = f1 + f2 + l1 + l2
        assert tok.tokenize(name) == [f1, f2, l1, l2]
        assert name.split()[0] not in tok.ids and " " + name.split()[1] not in tok.ids
        for p in (f1, f2, l1, l2):
            pieces.setdefault(p, set()).add(sport)
    # each piece of Kobe Bryant and Tiger Woods is shared with athletes of at least 3 other sports
    for p in ["K", "obe", " Bry", "ant", "T", "iger", " Wo", "ods"]:
        assert len(pieces[p]) >= 4, (p, pieces[p])
    names = [f1 + f2 + l1 + l2 for (f1, f2), (l1, l2), _ in gpt2_facts.TINY_ATHLETES]
    assert len(set(names)) == len(names) == 128
    assert sorted(collections.Counter(s for *_, s in gpt2_facts.TINY_ATHLETES).values()) == [16] * 8
    # round trip: every training sentence, and unseen words spelled from the corpus' characters
    for s in gpt2_facts.ALL_SENTENCES + ["Kobe Woods plays golf", "  Zebra  x", "The Wo"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.tokenize("Zebra") == list("Zebra")                  # unknown word: characters
    assert all(0 < i < len(tok) for s in gpt2_facts.ALL_SENTENCES for i in tok.encode(s))
    with pytest.raises(ValueError, match="not in the tiny tokenizer's vocabulary"):
        tok.encode("Kobe \u00e9")


def test_tiny_cache_is_retrained_when_tokenizer_data_or_config_change(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_training(tokenizer):                      # an untrained model of the right shape, fast
        trained.append(1)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **gpt2_facts.TINY_CONFIG))
    monkeypatch.setattr(gpt2_facts, "train_tiny", fake_training)
    path = str(tmp_path / "tiny.pt")
    gpt2_facts.load_tiny(path)
    gpt2_facts.load_tiny(path)
    assert len(trained) == 1                           # made once, then read from the cache
    ckpt = torch.load(path)
    assert (ckpt["tokens"], ckpt["sentences"], ckpt["config"]) == \
        (gpt2_facts.SubwordTokenizer().tokens, gpt2_facts.ALL_SENTENCES, gpt2_facts.TINY_CONFIG)
    changes = {"tokens": ckpt["tokens"][:-1], "sentences": ckpt["sentences"][1:],
               "config": {**ckpt["config"], "n_layer": 2}}
    for key, value in changes.items():
        stale = dict(torch.load(path), **{key: value})
        torch.save(stale, path)
        gpt2_facts.load_tiny(path)
        assert "retraining" in capsys.readouterr().out, key
    old = {k: v for k, v in torch.load(path).items() if k != "tokens"} | {"words": ["<pad>"]}
    torch.save(old, path)                              # a cache from the word-level tokenizer
    gpt2_facts.load_tiny(path)
    assert len(trained) == 1 + len(changes) + 1
    assert torch.load(path)["tokens"] == gpt2_facts.SubwordTokenizer().tokens


def test_suppression_on_conv1d_matches_dense_formula():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=23, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double().eval()
    name, cs = "transformer.h.1.mlp.c_fc", [1, 4]
    conv = model.get_submodule(name)
    assert isinstance(conv, Conv1D) and conv.weight.shape == (8, 32)   # (d_in, d_out)
    before = copy.deepcopy(model.state_dict())
    s = spd.SPDModel(model, name, C=6, ci="vector", d_gate=4).double()
    L = s.layers[name]
    edited = gpt2_facts.suppress_subcomponents(model, s, {name: cs})

    # W' by hand, (d_out, d_in), the coefficients all from the original W
    W = conv.weight.detach().T.clone()
    Wp = W.clone()
    for c in cs:
        u, v = L.U[:, c].detach(), L.V[c].detach()
        u, v = u / u.norm(), v / v.norm()
        Wp -= (u @ W @ v) * torch.outer(u, v)
    # (1) the edited layer computes x W'^T + b
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    layer = edited.get_submodule(name)
    assert torch.allclose(layer(x), x @ Wp.T + conv.bias, atol=1e-12, rtol=0)
    assert torch.allclose(layer.weight.T, Wp, atol=1e-12, rtol=0)

    # (2) the whole edited model equals a copy with W' written in by hand
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_submodule(name).weight.copy_(Wp.T)
    ids = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        y_edit, y_ref, y_orig = (m(input_ids=ids).logits for m in (edited, ref, model))
    assert torch.allclose(y_edit, y_ref, atol=1e-12, rtol=0)

    # (3) the edit changes the output; only that one weight changed; the caller's model untouched
    assert (y_edit - y_orig).abs().max() > 1e-6
    changed = [k for k, v in edited.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [name + ".weight"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (Wp - W).norm() > 1e-4


def test_default_model_offline_is_a_one_line_error(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    p = subprocess.run([sys.executable, "gpt2_facts.py", f"--out_dir={tmp_path}/out"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "gpt2" in lines[0] and "--model=tiny" in lines[0]
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("case", ["missing_folder", "empty_folder", "unknown_key", "bad_type",
                                  "bad_bool", "unknown_preset", "odd_batch", "not_key_value", "not_gpt2"])
def test_bad_input_is_a_one_line_error(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    if case == "not_gpt2":                        # another causal LM's folder: GPT-2's weights are not in it
        from transformers import LlamaConfig, LlamaForCausalLM
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
                         ).save_pretrained(tmp_path / "llama")
        capsys.readouterr()
    argv, expect = {
        "missing_folder": ([f"--model={tmp_path / 'no_such_model'}"], "no_such_model: there is no such folder"),
        "empty_folder": ([f"--model={tmp_path / 'empty'}"], "; it needs config.json, model weights and tokenizer files"),
        "unknown_key": (["--nope=1"], "unknown config key 'nope'"),
        "bad_type": (["--model=tiny", "--steps=abc"], "--steps needs an int"),
        "bad_bool": (["--model=tiny", "--save=maybe"], "--save needs true or false"),
        "unknown_preset": (["--model=tiny", "--preset=huge"], "unknown preset 'huge'"),
        "odd_batch": (["--model=tiny", "--batch_size=3"], "multiple of 2"),
        "not_key_value": (["--model=tiny", "steps"], "use --key=value"),
        "not_gpt2": ([f"--model={tmp_path / 'llama'}"], "llama is not a GPT-2: 16 of GPT-2's weights are not in it"),
    }[case]

    def no_training(*a, **k):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(gpt2_facts, "train_tiny", no_training)
    monkeypatch.setattr(spd, "train", no_training)
    monkeypatch.setattr(spd, "SPDModel", no_training)
    with pytest.raises(SystemExit) as e:
        gpt2_facts.main(argv + [f"--out_dir={tmp_path / 'out'}",
                                f"--tiny_path={tmp_path / 'tiny.pt'}"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [l for l in (out + err).splitlines()          # (transformers' progress bar aside)
             if l.strip() and not l.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], lines
    assert not (tmp_path / "tiny.pt").exists() and not (tmp_path / "out" / "spd.pt").exists()


def test_presets():
    paper = gpt2_facts.PRESETS["paper"]
    a31 = dict(batch_size=2, optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="constant",
               lr_warmup=0.01, steps=20_000, C=768, d_gate=64, ci="vector",
               beta_stochastic_recon=0.1, beta_stochastic_partial_recon=10,
               beta_stochastic_layerwise_recon=0.1, beta_recon=0.1, beta_partial_recon=10,
               beta_faithfulness=1e6, beta_minimality=0.05, p_start=0.9, p_final=0.1,
               last_token_only=False)
    for k, v in a31.items():
        assert paper[k] == v, k
    assert paper["beta_layerwise_recon"] == 0                  # not in the table
    # every preset key is a config field, and a parsed config carries the table
    fields = set(gpt2_facts.FactsConfig.__dataclass_fields__)
    for preset in gpt2_facts.PRESETS.values():
        assert set(preset) <= fields
    cfg = gpt2_facts.parse_config([])
    assert cfg.model == "gpt2" and cfg.preset == "paper"
    for k, v in a31.items():
        assert getattr(cfg, k) == v, k

    # tiny: the same losses and schedule at the tiny model's size
    tiny = gpt2_facts.PRESETS["tiny"]
    assert {k: v for k, v in tiny.items() if k not in ("C", "d_gate", "steps", "log_every", "threads",
                                                       "trace_window")} \
        == {k: v for k, v in paper.items() if k not in ("C", "d_gate", "steps", "log_every")}
    assert tiny["C"] == gpt2_facts.TINY_CONFIG["n_embd"] and tiny["threads"] == 1 and tiny["trace_window"] == 1

    # each model picks its default preset; --preset and --key=value override
    for model, preset in [("tiny", "tiny"), ("gpt2", "paper"), ("gpt2-random", "paper"),
                          ("/some/local/gpt2", "paper")]:
        cfg = gpt2_facts.parse_config([f"--model={model}"])
        assert cfg.preset == preset and cfg.model == model
        assert cfg.C == gpt2_facts.PRESETS[preset]["C"] and cfg.steps == gpt2_facts.PRESETS[preset]["steps"]
    assert gpt2_facts.parse_config(["--model=tiny", "--preset=paper"]).C == 768
    cfg = gpt2_facts.parse_config(["--model=tiny", "--C=8", "--steps=1e3"])
    assert (cfg.C, cfg.steps, cfg.d_gate) == (8, 1000, 16)


# -----------------------------------------------------------------------------
# induction.py

def induction_argv(tmp_path, *extra):
    """Small settings, and extra (which replaces a setting it repeats: a flag given twice is refused);
    with --bench, --table2 or --train-target only the settings the mode reads (it refuses the others)."""
    argv = ["--steps=6", "--batch_size=8", "--eval_batch=32", "--C=8", "--d_gate=4",
            "--target_steps=40", "--target_batch_size=32", "--target_stop_acc=2", "--faithfulness_warmup_steps=5",
            "--threads=1", "--log_every=3", "--device=cpu", f"--target_path={tmp_path}/target.pt",
            f"--out_dir={tmp_path}"]
    takes = next((induction.MODE_KEYS[e] for e in extra if e in induction.MODE_KEYS), None)
    key = lambda a: a[2:].split("=")[0]
    return [a for a in argv if (takes is None or key(a) in takes) and key(a) not in map(key, extra)] + list(extra)


def test_train_target_prints_the_mechanism_and_the_oracle(tmp_path, capsys, monkeypatch):
    """--train-target ends with what decides whether a target suits Table 1: Sec. 6.1 and the oracle;
    it makes no --out_dir (it writes --target_path only)."""
    monkeypatch.chdir(tmp_path)                                   # (the default --out_dir is relative)
    got = induction.main(induction_argv(tmp_path, "--train-target", "--target_eval_every=20"))
    assert not (tmp_path / "runs").exists()
    model = induction.read_target(str(tmp_path / "target.pt"))[0]
    assert got["oracle_kl"] == induction.oracle_kl(model) > 0 and 0 <= got["l0_m_to_s1"] <= 1
    assert f"oracle_kl {got['oracle_kl']:.4g}" in capsys.readouterr().out
    r = induction.main(induction_argv(tmp_path, "--figure5"))      # (its curve, end to end)
    assert [row["step"] for row in r["curve"]] == [20, 40] and r["target_step"] == 40
    assert f"wrote {tmp_path}/figure5.json" in capsys.readouterr().out
    cfg = induction.parse_config([f"--out_dir={tmp_path}/elsewhere"])[0]      # from another folder:
    assert cfg.target_path == os.path.join(HERE, "induction_target.pt")       # the committed target
    logs = []
    induction.load_or_train_target(str(tmp_path / "target.pt"), log=logs.append)
    assert logs[0] == f"loaded target from {tmp_path}/target.pt (40 steps of batch 32, lr 0.01, seed 0)"


def test_table2_and_bench_run(tmp_path, monkeypatch, capsys):
    """--table2 and --bench end to end, one timed step each (their timing loops are shortened):
    rows for every variant, files written, and --bench_against runs another spd.py beside ours."""
    monkeypatch.setattr(induction, "table2", functools.partial(induction.table2, repeats=1))
    monkeypatch.setattr(induction, "bench", functools.partial(induction.bench, steps=1))
    rows = induction.main(induction_argv(tmp_path, "--table2", "--max_memory_gb=0.5"))
    assert all(isinstance(rows[k][0], float) and rows[k][0] > 0 for k in ["Scalar", "Vector", "Attention (no flex)"])
    assert rows["Vector"][1].startswith("needs ~1 GB") and rows["Attention (flex)"][0] == "no backward on CPU"
    out = capsys.readouterr().out
    assert "Table 2: iterations per second" in out
    assert json.load(open(next(tmp_path.glob("table2_*.json"))))["it_per_s"] == rows
    assert f"wrote {next(tmp_path.glob('table2_*.json'))}" in out
    shutil.copy(spd.__file__, tmp_path / "old_spd.py")
    rows = induction.main(induction_argv(tmp_path, "--bench", f"--bench_against={tmp_path}/old_spd.py"))
    assert sorted(rows) == sorted(f"{ci} CI, {v}" for ci in ["vector", "attention"]
                                  for v in ["spd.py", f"{tmp_path}/old_spd.py"])
    assert all(v > 0 for v in rows.values()) and "ms/step" in capsys.readouterr().out
    assert json.load(open(next(tmp_path.glob("bench_*.json"))))["ms_per_step"] == rows


def test_figure2_and_figure5_png(tmp_path):
    """Where matplotlib is installed (it is optional: skipped without it), a PNG is written, a KL
    of 0 included, and its figure closed; Figure 5's too."""
    pytest.importorskip("matplotlib")
    r = {"spd": [{"pieces": 18.2, "kl": 1.8e-4}, {"pieces": 15.3, "kl": 0.64}],
         "svd": [{"pieces": 22, "kl": 4.5e-7}, {"pieces": 20, "kl": 0.0}]}
    assert induction.save_figure2(r, str(tmp_path / "figure2.png"))
    import matplotlib.pyplot as plt
    assert (tmp_path / "figure2.png").stat().st_size > 1000 and not plt.get_fignums()   # (closed)
    assert induction.save_figure5(induction.figure5(hand_curve()), str(tmp_path / "figure5.png"))
    assert (tmp_path / "figure5.png").stat().st_size > 1000 and not plt.get_fignums()


def test_induction_script_smoke(tmp_path, capsys):
    r = induction.main(induction_argv(tmp_path))
    out = capsys.readouterr().out
    assert "Table 1" in out and "mechanism" in out
    dec = r["mechanism_decomposed"]
    assert (f"the same in the decomposition, every matrix masked by g (of the intact input): m -> s1 "
            f"{dec['l0_m_to_s1']:.4f} -> {dec['l0_m_to_s1_no_q_pos']:.4f}; accuracy {dec['acc']:.4f} -> "
            f"{dec['acc_no_q_pos']:.4f}") in out
    lines = []                                                 # a metric keeps its digits: 2.00, not 2
    induction.print_table1({**r, "metrics": {**r["metrics"], "attn_kl_layer2": 2.0}}, log=lines.append)
    assert any(l.startswith("  attn_kl_layer2") and l.endswith(" 2.00 | 0.002") for l in lines)
    with open(tmp_path / "table1.json") as f:
        saved = json.load(f)
    assert saved["active"] == r["active"] and saved["config"]["C"] == 8
    assert set(r["active"]) == set(induction.MATRICES) == set(r["unique"])
    for short, row in r["active"].items():
        assert set(row) == {"s1", "m", "s2", "random"}
        assert all(0 <= v <= 8 for v in row.values())
        assert 0 <= r["unique"][short] <= 8
    assert set(r["metrics"]) >= set(induction.PAPER_TABLE1["metrics"])
    assert all(math.isfinite(v) and v >= -1e-6 for v in r["metrics"].values())
    assert r["metrics"]["attn_kl_mean"] == pytest.approx(
        (r["metrics"]["attn_kl_layer1"] + r["metrics"]["attn_kl_layer2"]) / 2)
    assert r["metrics"]["attn_kl_mean_circuit"] == pytest.approx(     # Table 1's Mean: of its two rows
        (r["metrics"]["attn_kl_layer1_query_m"] + r["metrics"]["attn_kl_layer2_query_s2"]) / 2)
    assert all(0 <= v <= 1 for v in r["mechanism"].values())
    assert len(r["history"]) >= 2 and r["history"][-1]["step"] == 5
    target = induction.load_or_train_target(str(tmp_path / "target.pt"), log=lambda *a: None)
    assert r["eval_sequences"] == 32 and r["mechanism"] == induction.mechanism_check(target, 32)  # --eval_batch's
    assert r["oracle_kl"] == induction.oracle_kl(target, 8 * 32)                     # count (8 times), too
    # the decomposition reloads against the cached target and gives the same faithfulness
    s, cfg = spd.load(tmp_path / "spd.pt", target)
    assert spd.faithfulness_loss(s).item() == pytest.approx(r["metrics"]["L_faithful"], rel=1e-5)
    # L_recon, and the per-matrix layerwise KLs' mean, are the losses spd.reconstruction_losses gives
    tokens, _ = induction.make_batch(32, generator=torch.Generator().manual_seed(induction.EVAL_SEED + 3))
    with torch.no_grad():
        g = spd.causal_importances(s, tokens)
        rec = spd.reconstruction_losses(s, tokens, target(tokens), g, [], ["recon", "layerwise_recon"],
                                        last_token_only=True)
    assert list(r["layerwise_by_matrix"]) == list(induction.MATRICES)
    assert r["metrics"]["L_recon"] == pytest.approx(rec["recon"].item(), rel=1e-5)
    assert r["metrics"]["L_recon_layerwise"] == pytest.approx(rec["layerwise_recon"].item(), rel=1e-5)
    # same seed, same numbers (the target is cached now, so only the decomposition reruns)
    again = induction.main(induction_argv(tmp_path, f"--out_dir={tmp_path}/again"))
    assert again["active"] == r["active"] and again["metrics"] == r["metrics"]
    # Table 1 again from the saved decomposition: the same sequences give the same table
    t1 = induction.main(induction_argv(tmp_path, "--table1"))
    assert t1["active"] == r["active"] and t1["metrics"] == r["metrics"]
    assert (tmp_path / "table1_32_sequences.json").exists()
    before = (tmp_path / "table1_32_sequences.json").read_bytes()      # another threshold: its own file
    induction.main(induction_argv(tmp_path, "--table1", "--threshold=0.2"))
    assert (tmp_path / "table1_32_sequences_threshold_0.2.json").exists()
    assert (tmp_path / "table1_32_sequences.json").read_bytes() == before
    (tmp_path / "table1_32_sequences.json").write_text("{}")            # an earlier measurement's file
    induction.main(induction_argv(tmp_path, "--table1"))                # is kept; this one is stamped
    assert (tmp_path / "table1_32_sequences.json").read_text() == "{}"
    again = [p for p in os.listdir(tmp_path) if re.fullmatch(r"table1_32_sequences_\d{8}_\d{6}_\d+\.json", p)]
    assert len(again) == 1 and (tmp_path / again[0]).read_bytes() == before
    # Figure 2 on the saved decomposition
    fig = induction.main(induction_argv(tmp_path, "--svd-baseline"))
    assert (tmp_path / "figure2_32_sequences.json").exists() and fig["full_rank"] == 6 * 16  # (not 1024:
    assert not (tmp_path / "figure2.json").exists()             # another file, so neither replaces the other)
    induction.main(induction_argv(tmp_path, "--svd-baseline"))
    assert len([p for p in os.listdir(tmp_path) if p.startswith("figure2_32_sequences_") and p.endswith(".json")]) == 1
    assert [p["pieces"] for p in fig["svd"]] == sorted(p["pieces"] for p in fig["svd"])[::-1]
    assert all(0 <= p["pieces"] <= 6 * 8 for p in fig["spd"])


def test_attention_kl_where_a_pattern_rounds_to_zero():
    """From log patterns: a key the decomposed model gives e^-200 (0.0 as a float32 probability,
    which made the KL inf) adds its true term; a causally masked key (-inf in both) adds 0."""
    inf = math.inf
    log_t = torch.tensor([[[0.0, -inf], [math.log(0.5), math.log(0.5)]]])     # (1, 2 queries, 2 keys)
    log_p = torch.tensor([[[0.0, -inf], [0.0, -200.0]]])
    assert log_p.exp()[0, 1, 1] == 0
    kl = induction.attention_kl(log_t, log_p)
    assert kl.shape == (1, 2) and kl[0, 0] == 0
    assert kl[0, 1].item() == pytest.approx(math.log(0.5) + 0.5 * 200, rel=1e-6)   # 99.31


def test_table1_counts_and_attention_kls_by_hand(monkeypatch):
    """Table 1 on a hand-made g: (a) counts only g > threshold, at s1, m, s2 and the other
    positions; (b) unique over all of them; (c) attention KL(target || masked by g) at m (layer 1)
    and s2 (layer 2), against a dense recomputation."""
    torch.manual_seed(0)
    target = induction.InductionTransformer()
    s = spd.SPDModel(target, list(induction.MATRICES.values()), C=4, ci="vector", d_gate=2)
    cfg = induction.InductionConfig(eval_batch=8, threshold=0.25)        # (exact in binary: > is tested)
    tokens, s1 = induction.make_batch(8, 64, 128, torch.Generator().manual_seed(induction.EVAL_SEED + 3))
    b, m = torch.arange(8), s1 + 1
    other = next(p for p in range(64) if p not in (s1[0], m[0], 63))  # an "other" position of sequence 0
    g = torch.zeros(8, 64, 4)
    g[b, m, 0] = 0.5                                                   # on at every m
    g[b, s1, 1] = 0.25                                                 # at the threshold at s1: off
    g[0, other, 2] = 0.3                                               # once elsewhere
    g[1, 63, 3] = 0.4                                                  # at s2 of one sequence
    masks = {name: g.clone() for name in s.layers}
    monkeypatch.setattr(spd, "causal_importances", lambda s_, x: masks)
    r = induction.table1(s, target, cfg)
    for short in induction.MATRICES:
        assert r["active"][short] == pytest.approx({"s1": 0, "m": 1, "s2": 1 / 8, "random": 1 / (8 * 61)})
        assert r["unique"][short] == 3
    hand = copy.deepcopy(target)                       # each layer masked by hand, not by SPDModel:
    for name, layer in s.layers.items():              # y = U (g ⊙ V x) + b at every position
        lin = hand.get_submodule(name)
        lin.forward = lambda x, U=layer.U, V=layer.V, g=masks[name], bias=lin.bias: torch.einsum(
            "oc,bsc,ci,bsi->bso", U, g, V, x) + (0 if bias is None else bias)
    with torch.no_grad():
        _, attn = hand(tokens, return_attn=True)
        _, attn_t = target(tokens, return_attn=True)
    log = lambda p: p.clamp_min(1e-30).log()                                  # (no p rounds to 0 here)
    kl = [(pt * (log(pt) - log(p))).sum(-1) for pt, p in
          zip((a.exp() for a in attn_t), (a.exp() for a in attn))]            # (B, S) per layer
    assert kl[0][b, m].mean() > 1e-3 and kl[1][:, -1].mean() > 1e-3
    assert r["metrics"]["attn_kl_layer1_query_m"] == pytest.approx(kl[0][b, m].mean().item(), rel=1e-4)
    assert r["metrics"]["attn_kl_layer2_query_s2"] == pytest.approx(kl[1][:, -1].mean().item(), rel=1e-4)
    assert r["metrics"]["attn_kl_layer1"] == pytest.approx(kl[0].mean().item(), rel=1e-4)

    assert r["mechanism_decomposed"] == induction.mechanism_check(target, 8, decomposition=s)


def test_mechanism_check_in_the_decomposition(monkeypatch):
    """Sec. 6.1's check in the decomposed model: with exact components (U V = W) and every mask 1
    it is the target's; with every mask 0, layer 0's q and k are 0, so m attends uniformly to
    its m + 1 keys, and with g on only at s1 (K0) and m (Q0) the same attention as the target
    computed by hand from those two rows alone."""
    torch.manual_seed(0)
    target = induction.InductionTransformer()
    s = spd.SPDModel(target, list(induction.MATRICES.values()), C=16, ci="vector", d_gate=2)
    with torch.no_grad():
        for layer in s.layers.values():
            layer.U.copy_(layer.W)
            layer.V.copy_(torch.eye(16))
    n, seed = 64, 3
    tokens, s1 = induction.make_batch(n, 64, 128, torch.Generator().manual_seed(seed))
    b, m = torch.arange(n), s1 + 1
    ones = {name: torch.ones(n, 64, 16) for name in s.layers}
    monkeypatch.setattr(spd, "causal_importances", lambda s_, x: ones)
    got, want = induction.mechanism_check(target, n, seed, s), induction.mechanism_check(target, n, seed)
    assert got == pytest.approx(want, rel=1e-5) and want["l0_m_to_s1"] > 0.02 and want["acc"] < 1
    zeros = {name: torch.zeros(n, 64, 16) for name in s.layers}
    monkeypatch.setattr(spd, "causal_importances", lambda s_, x: zeros)
    got = induction.mechanism_check(target, n, seed, s)
    uniform = (1 / (m + 1.0)).mean().item()
    assert got["l0_m_to_s1"] == pytest.approx(uniform, rel=1e-5) == got["l0_m_to_s1_no_q_pos"]
    Q0, K0 = induction.MATRICES["Q0"], induction.MATRICES["K0"]
    circuit = {name: torch.zeros(n, 64, 16) for name in s.layers}
    circuit[Q0][b, m] = circuit[K0][b, s1] = 1
    monkeypatch.setattr(spd, "causal_importances", lambda s_, x: circuit)
    x = target.embed(tokens) + target.pe
    attn0 = target.blocks[0].attn
    q, k = attn0.q_proj(x[b, m]), attn0.k_proj(x[b, s1])                       # (n, d) each
    score = (q * k).sum(-1) / 4                                                 # the other keys: 0
    hand = (score.exp() / (score.exp() + m)).mean().item()
    assert induction.mechanism_check(target, n, seed, s)["l0_m_to_s1"] == pytest.approx(hand, rel=1e-5)

def test_induction_bad_input(tmp_path):
    with pytest.raises(spd.SPDError, match="unknown config key"):
        induction.main(induction_argv(tmp_path, "--nope=1"))
    with pytest.raises(spd.SPDError, match="unknown preset"):
        induction.main(induction_argv(tmp_path, "--preset=huge"))
    with pytest.raises(spd.SPDError, match="^--table1 is a mode: pass it without =true$"):
        induction.main(induction_argv(tmp_path, "--table1=true"))
    with pytest.raises(spd.SPDError, match=r"--svd-baseline reads .*none/spd.pt, which is not there: pass the --out_dir of your run, or run the decomposition"):
        induction.main(induction_argv(tmp_path, "--svd-baseline", f"--out_dir={tmp_path}/none",
                                      "--target_steps=1"))
    with pytest.raises(spd.SPDError, match=r"--target_path=.*/spd.pt is where this run writes its decomposition"):
        induction.main(induction_argv(tmp_path, f"--target_path={tmp_path}/spd.pt"))
    os.symlink(tmp_path, tmp_path / "link")                  # (the same folder by another name too)
    for target in ("table1.json", "link/figure2.png"):
        with pytest.raises(spd.SPDError, match="is where this run writes its decomposition or its measurements"):
            induction.main(induction_argv(tmp_path, f"--target_path={tmp_path}/{target}"))
    assert not (tmp_path / "table1.json").exists()


def test_induction_run_holds_its_folder_and_checks_it_again(tmp_path, monkeypatch):
    """A decomposition run holds the out_dir's lock from before it builds the decomposition until
    its files are written, and looks for a finished run again under the lock: a run that finished
    into the folder meanwhile is kept, and a run holding it stops the second one."""
    argv = induction_argv(tmp_path, "--steps=2")
    load = induction.load_or_train_target
    with spd._locked(str(tmp_path / "checkpoint.pt")):                 # (another run, training)
        with pytest.raises(spd.SPDError, match="another run is using .*checkpoint.pt"):
            induction.main(argv)

    held = []

    def table1(*a, **k):                              # (another process's flock, on its own handle)
        import fcntl
        with open(tmp_path / "checkpoint.pt.lock", "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(True)
        return real_table1(*a, **k)
    real_table1 = induction.table1
    monkeypatch.setattr(induction, "table1", table1)
    induction.main(argv)
    assert held == [True] and not spd._HELD                           # (released, forgotten)
    for f in ("spd.pt", "table1.json"):
        os.remove(tmp_path / f)
    monkeypatch.undo()

    def finished_meanwhile(*a, **k):                                   # (another run finished)
        (tmp_path / "spd.pt").write_bytes(b"theirs")
        return load(*a, **k)
    monkeypatch.setattr(induction, "load_or_train_target", finished_meanwhile)
    with pytest.raises(spd.SPDError, match="holds a finished run .spd.pt."):
        induction.main(argv)
    assert (tmp_path / "spd.pt").read_bytes() == b"theirs"


def test_reading_a_run_with_another_target_names_the_runs_target(tmp_path):
    a, b = (induction.InductionTransformer() for _ in range(2))      # (two random targets)
    spd.save(spd.SPDModel(a, "blocks.0.attn.q_proj", C=4), str(tmp_path / "spd.pt"),
             {"target_path": "runs/a/target.pt"})
    cfg = induction.parse_config([])[0]
    with pytest.raises(spd.SPDError, match=r"made for a different target: .*; pass the target it was made "
                                           r"for \(the run's: --target_path=runs/a/target.pt\)$"):
        induction.read_run(str(tmp_path / "spd.pt"), b, cfg, [])
    cfg.target_path = "runs/a/target.pt"                                 # (retrained in place)
    with pytest.raises(spd.SPDError, match=r"\(the run's --target_path is this one: the file there changed"):
        induction.read_run(str(tmp_path / "spd.pt"), b, cfg, [])
    torch.save({**torch.load(tmp_path / "spd.pt", weights_only=True), "config": []}, tmp_path / "spd.pt")
    with pytest.raises(spd.SPDError, match=r"pass the target it was made for$"):   # (no hint, no crash)
        induction.read_run(str(tmp_path / "spd.pt"), b, cfg, [])


def test_a_diverged_target_is_not_saved(tmp_path):
    """A target whose weights stop being finite ends in one line naming --target_lr, saves nothing,
    and a file with non-finite weights is refused as a target; a target being trained to a path is
    locked (a second run training to it stops)."""
    path = str(tmp_path / "t.pt")
    with pytest.raises(spd.SPDError, match="weights are not finite; stopped, nothing saved; try a lower --target_lr"):
        induction.train_target(steps=20, batch_size=16, lr=1e6, warmup=0, eval_every=10, save_path=path,
                               log=lambda *a: None)
    assert not os.path.exists(path)
    model = induction.InductionTransformer()
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    induction.save_target(model, path)
    with pytest.raises(spd.SPDError, match="holds weights that are not finite"):
        induction.read_target(path)
    induction.save_target(induction.InductionTransformer(), str(tmp_path / "u.pt"))  # (a finished one)
    with spd._locked(str(tmp_path / "u.pt")):                # (read under the lock, not before it)
        with pytest.raises(spd.SPDError, match="another run is using .*u.pt: wait for it, or pass another --target_path"):
            induction.train_target(steps=2, batch_size=4, save_path=str(tmp_path / "u.pt"), log=lambda *a: None)


def test_a_target_stopped_before_its_finished_file_continues(tmp_path, monkeypatch):
    """Ctrl-C after the last step but before the finished file is written (no later check saves
    the last step with its optimizer): the same command continues from the last check and ends
    with the weights and curve of an unbroken run, finished, not "at step N already"."""
    kw = dict(steps=7, batch_size=8, eval_every=3, target_acc=None, log=lambda *a: None)
    whole = induction.train_target(save_path=str(tmp_path / "whole.pt"), **kw)
    path, save = str(tmp_path / "t.pt"), induction.save_target

    def ctrl_c_at_the_end(model, p, **extra):
        if "optimizer" not in extra:
            raise KeyboardInterrupt
        save(model, p, **extra)
    monkeypatch.setattr(induction, "save_target", ctrl_c_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        induction.train_target(save_path=path, **kw)
    assert induction.read_target(path)[1]["step"] == 6                  # the last check's file
    monkeypatch.undo()
    again = induction.train_target(save_path=path, **kw)
    saved = induction.read_target(path)[1]
    assert saved["step"] == 7 and "optimizer" not in saved
    assert saved["curve"] == induction.read_target(str(tmp_path / "whole.pt"))[1]["curve"]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), again.state_dict().values()))


def test_a_target_below_its_stop_accuracy_is_not_finished(tmp_path, capsys):
    """A target that ends below --target_stop_acc is one line and is never marked finished: with a
    path, its last check stays there unfinished (a higher --target_steps continues it); without
    one (the stand-in of a run with no target file), nothing is saved and the run stops."""
    path = str(tmp_path / "t.pt")
    with pytest.raises(spd.SPDError, match=r"held-out accuracy 0\.\d+ < --target_stop_acc=0.995 in 4 steps; "
                                           r".*t.pt is kept unfinished: continue it with a higher --target_steps"):
        induction.train_target(steps=4, batch_size=8, eval_every=2, save_path=path, log=lambda *a: None)
    assert induction.read_target(path)[1]["step"] == 4 and "optimizer" in induction.read_target(path)[1]
    argv = induction_argv(tmp_path, "--target_stop_acc=0.995", "--target_steps=4",
                          f"--target_path={tmp_path}/none.pt", f"--out_dir={tmp_path}/run")
    assert induction.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("in 4 steps; nothing saved: raise --target_steps"), err
    assert not os.path.exists(tmp_path / "none.pt") and not os.path.exists(tmp_path / "run" / "spd.pt")


def test_atomic_write_failure_keeps_the_earlier_file(tmp_path):
    """A write that fails (a full disk) is one line; the earlier file stays whole and the temporary
    file, whose name holds the process id (two processes never share one), is removed."""
    path = str(tmp_path / "r.json")
    spd.atomic_write(path, {"a": 1})
    names = []

    def full(tmp):
        names.append(tmp)
        open(tmp, "w").write("{")
        raise OSError(28, "No space left on device")
    with pytest.raises(spd.SPDError, match=r"cannot write .*r.json \(OSError: \[Errno 28\] No space left on "
                                           r"device\); the earlier file there is kept$"):
        spd.atomic_write(path, full)
    assert str(os.getpid()) in names[0] and not os.path.exists(names[0])
    assert json.load(open(path)) == {"a": 1}

    def fails(error):
        def write(tmp):
            open(tmp, "w").write("{")
            raise error
        return write
    for error in ("basic_ios::clear: iostream error", ""):          # (torch.save's, on a full disk)
        with pytest.raises(spd.SPDError, match=re.escape(f"new.pt (RuntimeError: {error or '-'})") + "$"):
            spd.atomic_write(str(tmp_path / "new.pt"), fails(RuntimeError(error)))   # (nothing kept)
    for error in (TypeError("set is not JSON serializable"), KeyboardInterrupt()):   # (not hidden)
        with pytest.raises(type(error)):
            spd.atomic_write(path, fails(error))
    assert sorted(os.listdir(tmp_path)) == ["r.json"] and json.load(open(path)) == {"a": 1}


def test_a_target_saved_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two runs that train a target to one new --target_path: the second to finish stops, and the
    first one's target stays (a run using it may be training on it)."""
    path, first = str(tmp_path / "t.pt"), induction.InductionTransformer()

    def train_target(**kw):
        induction.save_target(first, path)                      # the other run finishes first
        return induction.InductionTransformer()
    monkeypatch.setattr(induction, "train_target", train_target)
    with pytest.raises(spd.SPDError, match="t.pt was saved by another run while this one trained its target"):
        induction.load_or_train_target(path, log=lambda *a: None)
    kept = induction.read_target(path)[0].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in first.state_dict().items())


class TwoMatrices(nn.Module):
    """logits = out(B(A(embed(t)))) with A of rank 2 (known), B orthogonal (full rank)."""

    def __init__(self, d=6, vocab=9):
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.A, self.B = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.A.weight.copy_(torch.randn(d, 2) @ torch.randn(2, d))
            self.B.weight.copy_(torch.linalg.qr(torch.randn(d, d))[0] * 3)  # all directions matter

    def forward(self, t):
        return self.out(self.B(self.A(self.embed(t))))


def test_greedy_svd_pruning_on_known_rank():
    torch.manual_seed(0)
    m, x = TwoMatrices(), torch.randint(0, 9, (32, 3))
    before = copy.deepcopy(m.state_dict())
    path = induction.greedy_svd_pruning(m, ["A", "B"], x, tau=1e-6)
    assert path[0] == (12, pytest.approx(0.0, abs=1e-9))
    assert path[-1][0] == 8 and all(kl <= 1e-6 for _, kl in path)   # A's 4 zero directions go
    full = induction.greedy_svd_pruning(m, ["A", "B"], x, tau=float("inf"))
    assert [r for r, _ in full] == list(range(12, -1, -1))         # down to rank 0
    assert full[:len(path)] == path                                 # tau only moves the stop
    assert all(kl > 1e-4 for r, kl in full if r < 8)                # below the rank, KL rises
    assert induction.svd_sweep(full, [1e-6, float("inf")]) == [(1e-6, *path[-1]), (float("inf"), *full[-1])]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # caller's model untouched


def test_target_training_resumes_exactly(tmp_path):
    """A target run stopped after a save continues to the same weights as an unbroken run."""
    path, kw = str(tmp_path / "t.pt"), dict(steps=30, batch_size=16, eval_every=10, target_acc=None)
    whole = induction.train_target(log=lambda *a: None, **kw)

    def stop_at_20(line):
        if line.startswith("step     20"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        induction.train_target(log=stop_at_20, save_path=path, **kw)
    assert torch.load(path, weights_only=True)["step"] == 10
    lines = []
    resumed = induction.train_target(log=lines.append, save_path=path, **kw)
    assert lines[0] == f"continuing {path} from step 11" and not any(
        l.startswith("step      0") for l in lines)                    # steps 11-29 only
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                   resumed.state_dict().values()))
    assert "optimizer" not in torch.load(path, weights_only=True)  # finished


def test_target_curve_rows_are_interval_means_and_a_resume_continues_them(tmp_path, monkeypatch, ctrl_c_fails):
    """Figure 5's curve: a row per check and at the last step, its loss the mean of the training
    losses since the previous row (as cross_entropy returned them); Ctrl-C between checks and the
    same call again record an unbroken run's rows exactly; a file from before the curve resumes
    with a curve that starts there."""
    import signal
    losses, calls, at = [], [], []
    cross_entropy, make_batch = F.cross_entropy, induction.make_batch

    def ce(*a, **kw):                                    # (only the training loss uses it)
        losses.append((loss := cross_entropy(*a, **kw)).item())
        return loss

    def batch(B, *a, **kw):
        calls.extend([1] * (B == 8))                     # (training batches: the checks' are larger)
        if B == 8 and len(calls) in at:
            signal.raise_signal(signal.SIGINT)           # Ctrl-C during that step
        return make_batch(B, *a, **kw)
    monkeypatch.setattr(F, "cross_entropy", ce)
    monkeypatch.setattr(induction, "make_batch", batch)
    evaluate = induction.evaluate_target                 # (fewer held-out sequences: faster)
    monkeypatch.setattr(induction, "evaluate_target", lambda model, n, seed: evaluate(model, 64, seed))
    kw = dict(steps=25, batch_size=8, eval_every=10, target_acc=None, log=lambda *a: None)
    curve_of = lambda path: induction.read_target(path)[1]["curve"]
    induction.train_target(save_path=str(tmp_path / "whole.pt"), **kw)
    whole = curve_of(str(tmp_path / "whole.pt"))
    assert [r["step"] for r in whole] == [10, 20, 25] and len(losses) == 25
    assert [r["loss"] for r in whole] == pytest.approx([statistics.fmean(losses[a:b]) for a, b in
                                                       [(0, 10), (10, 20), (20, 25)]], rel=1e-12)
    path = str(tmp_path / "t.pt")
    calls[:], at[:] = [], [13]
    with pytest.raises(spd.SPDError, match="interrupted after step 13"):
        induction.train_target(save_path=path, **kw)
    saved = induction.read_target(path)[1]
    assert saved["curve"] == whole[:1] and saved["curve_since"][1] == 3
    assert induction.read_curve(path)["finished"] is False                      # (--figure5 says so)
    shutil.copy(path, tmp_path / "old.pt")
    calls[:], at[:] = [], []
    induction.train_target(save_path=path, **kw)
    assert curve_of(path) == whole and induction.read_curve(path)["finished"] is True   # (==: exactly)
    old = str(tmp_path / "old.pt")                                   # as saved before the curve
    torch.save({k: v for k, v in torch.load(old, weights_only=True).items() if "curve" not in k}, old)
    losses[:] = []
    induction.train_target(save_path=old, **kw)
    assert [r["step"] for r in curve_of(old)] == [20, 25] and curve_of(old)[1] == whole[2]
    assert curve_of(old)[0]["loss"] == pytest.approx(statistics.fmean(losses[:7]), rel=1e-12)  # steps 14-20
    calls[:], at[:] = [], [3]                  # Ctrl-C at step 3 when the accuracy is reached: it finishes
    induction.train_target(save_path=str(tmp_path / "early.pt"), **{**kw, "target_acc": 0.0})
    assert [r["step"] for r in curve_of(str(tmp_path / "early.pt"))] == [3]       # (its last row too)


def hand_curve():
    """100 checks 10 steps apart: a plateau, a fall in two steep checks, two slow, one steep, a
    spike and its return (1.55 nats below the check before, 0.05 below the earlier low), a slow
    tail that then falls 100x in one check, by 0.04 nats (steep only on a log axis)."""
    losses = [4.8] * 40 + [4.75, 3.0, 1.0, 0.95, 0.9, 0.5, 2.0] + [0.45 - 0.05 * i for i in range(9)] + [0.04] + [4e-4] * 43
    return [dict(step=10 * (i + 1), loss=l, acc=0.5, m_to_s1=0.25) for i, l in enumerate(losses)]


def test_figure5_phase_changes_table_json_and_an_earlier_json_kept(tmp_path, monkeypatch, capsys):
    """--figure5 reads the curve saved in the target (it trains nothing): our rule's phase changes
    on a hand-made curve, ~25 evenly spaced rows plus the last and the phase changes' (ends marked),
    figure5.json; a second call keeps the first's figure5.json and writes another."""
    monkeypatch.setattr(induction, "train_target", None)             # (a call would fail)
    induction.save_target(induction.InductionTransformer(), str(tmp_path / "target.pt"), step=1000,
                          curve=hand_curve())
    r = induction.main(induction_argv(tmp_path, "--figure5"))
    assert [(c["plateau_from"], c["start"], c["end"], c["loss_start"], c["loss_end"]) for c in r["phase_changes"]] \
        == [(10, 410, 430, 4.75, 1.0), (430, 450, 460, 0.9, 0.5)]
    out = capsys.readouterr().out
    rows = re.findall(r"^ +(\d+) +\S+e[+-]\d+ +0.5000 +0.250( \*)?$", out, re.M)
    assert "(finished, at step 1000; 100 checks, 29 shown" in out and len(rows) == 29 and rows[-1] == ("1000", "")
    assert [step for step, _ in rows if 400 < int(step) < 470] == ["410", "420", "430", "450", "460"]
    assert [step for step, star in rows if star] == ["410", "430", "450", "460"]
    assert "steps 410-430 fall 4.75 -> 1 " in out and "steps 450-460 fall 0.9 -> 0.5 " in out
    first = (tmp_path / "figure5.json").read_bytes()
    assert json.loads(first) == r and r["target_step"] == 1000 and r["finished"]
    induction.main(induction_argv(tmp_path, "--figure5"))
    assert (tmp_path / "figure5.json").read_bytes() == first and len(list(tmp_path.glob("figure5_*.json"))) == 1
    assert "figure5.json is kept (an earlier measurement)" in capsys.readouterr().out


def test_induction_data_and_positions():
    """The official conventions: [BOS] T.. s m T.. s, s1 in [2, S-3], sinusoidal positions."""
    tokens, s1 = induction.make_batch(4096, 64, 128, torch.Generator().manual_seed(0))
    s = induction.s_token(128)
    b = torch.arange(4096)
    assert (tokens[:, 0] == induction.BOS).all() and (tokens[:, -1] == s).all()
    assert (tokens[b, s1] == s).all() and s1.min() == 2 and s1.max() == 61
    assert ((tokens == s).sum(1) == 2).all() and (tokens[:, 1:] != induction.BOS).all()
    assert tokens[:, 1:-1][tokens[:, 1:-1] != s].min() == 1 and tokens.max() == s
    pe = induction.sinusoidal_positions(10, 4)
    assert pe[3, 0] == pytest.approx(math.sin(3)) and pe[3, 1] == pytest.approx(math.cos(3))
    assert pe[3, 2] == pytest.approx(math.sin(3 / 100)) and pe[3, 3] == pytest.approx(math.cos(3 / 100))
    # "output": q = W_Q x + pe, so W_Q = W_K = 0 leaves scores pe·pe. The default "input"
    # (Shortformer): q = W_Q (x + pe), so W = 0 projects the positions away too (uniform), and
    # W = I with a zero embedding gives pe·pe again
    causal = torch.ones(64, 64, dtype=torch.bool).triu(1)
    for positions, w, scores_pe in [("output", 0.0, True), ("input", 0.0, False), ("input", 1.0, True)]:
        m = induction.InductionTransformer(positions=positions)
        with torch.no_grad():
            m.blocks[0].attn.q_proj.weight.copy_(w * torch.eye(16))
            m.blocks[0].attn.k_proj.weight.copy_(w * torch.eye(16))
            m.embed.weight.mul_(1 - w)
        _, (att0, _) = m(tokens[:2], return_attn=True)
        pe = m.pe[:64] if scores_pe else torch.zeros(64, 16)
        ref = ((pe @ pe.T) / 4).masked_fill(causal, -math.inf)
        assert torch.allclose(att0[0].exp(), ref.softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match="positions="):
        induction.InductionTransformer(positions="after")


def test_induction_presets():
    """`paper` is Table 4 exactly; `cpu` changes only the listed settings (README: why each)."""
    table4 = dict(batch_size=1024, optimizer="adam", lr=1e-3, lr_schedule="cosine", lr_warmup=0.0,
                  steps=100_000, C=100, d_gate=16, ci="attention", beta_stochastic_recon=1.0,
                  beta_stochastic_layerwise_recon=1.0, beta_recon=0.5, beta_faithfulness=1000.0,
                  beta_minimality=0.02, p_start=0.9, p_final=0.1, last_token_only=True)
    paper, _ = induction.parse_config(["--preset=paper"])
    cpu, _ = induction.parse_config([])
    assert {k: getattr(paper, k) for k in table4} == table4
    assert paper.beta_layerwise_recon == 0 and paper.faithfulness_warmup_steps == 0
    assert paper.minimality_decay_from == 1                              # β_minimality constant
    changed = {f.name for f in dataclasses.fields(spd.Config)            # the decomposition's
               if getattr(cpu, f.name) != getattr(paper, f.name)}        # (not the target's)
    assert changed == {"batch_size", "steps", "C", "lr", "beta_layerwise_recon", "beta_minimality",
                       "minimality_decay_from", "beta_minimality_final", "faithfulness_warmup_steps"}


def test_target_files_without_positions_load_as_output(tmp_path):
    """Target files written before the `positions` key existed all used positions="output"."""
    torch.manual_seed(0)
    m = induction.InductionTransformer(positions="output")
    path = str(tmp_path / "old.pt")
    induction.save_target(m, path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["positions"]
    torch.save(ckpt, path)
    loaded = induction.read_target(path)[0]
    tokens, _ = induction.make_batch(4, generator=torch.Generator().manual_seed(0))
    assert loaded.config["positions"] == "output" and torch.equal(loaded(tokens), m(tokens))


COMMITTED_TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "induction_target.pt")


def test_committed_target_is_table3_and_supports_the_circuit():
    """induction_target.pt: Table 3's recipe with Shortformer positions, solves the task, needs
    the positions on m's query, and the paper's circuit alone nearly reproduces it (oracle KL
    2.3e-4 at n 8192, 2.0e-4 on the first 1024; the issue's aim is 1e-4); a random target's does not."""
    ckpt = torch.load(COMMITTED_TARGET, weights_only=True)
    assert {k: ckpt["recipe"][k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup")} == \
        dict(steps=100_000, batch_size=1024, lr=1e-3, weight_decay=0.01, warmup=1000)
    assert ckpt["step"] == 100_000 and "--train-target" in ckpt["command"]
    assert ckpt["config"]["positions"] == "input"
    target = induction.load_or_train_target(COMMITTED_TARGET, log=lambda *a: None)
    assert induction.evaluate_target(target, n=1024) >= 0.99
    mech = induction.mechanism_check(target, n=512)
    assert mech["acc"] >= 0.99 and mech["acc_no_q_pos"] < 0.1
    assert mech["l0_m_to_s1"] > 3 * mech["l0_m_to_s1_no_q_pos"]
    kl, attn = induction.oracle_kl(target, n=256, attention=True)
    assert kl == induction.oracle_kl(target, n=256) < 5e-4
    assert attn["layer1_query_m"] == pytest.approx(0.677, abs=0.01)        # (at m; s1 gives 0.35, m + 1
    assert attn["layer2_query_s2"] == pytest.approx(0.0147, abs=0.002)     # 0.61; README: n 1024 0.685 / 0.0162)
    torch.manual_seed(0)
    assert induction.oracle_kl(induction.InductionTransformer(), n=256) > 1e-3


def test_oracle_kl_averages_its_batches(monkeypatch):
    """oracle_kl draws n sequences `batch` at a time from one stream (batch i seeded seed + i for
    its mask draws) and weights each batch's KL by its size (the last may be smaller); n and batch
    must be >= 1."""
    seen = []
    def fake(target, tokens, s1, *, seed, attention, **rest):
        seen.append((len(tokens), seed, tokens))
        k = float(len(tokens))
        return (k, {"layer1_query_m": 2 * k}) if attention else k
    monkeypatch.setattr(induction, "_oracle_batch", fake)
    torch.manual_seed(0)
    target = induction.InductionTransformer()
    assert induction.oracle_kl(target, 20, seed=7, batch=16) == pytest.approx((16 * 16 + 4 * 4) / 20)
    gen = torch.Generator().manual_seed(7)                              # one stream: both batches
    want = [induction.make_batch(k, generator=gen)[0] for k in (16, 4)]
    assert [(n, sd) for n, sd, _ in seen] == [(16, 7), (4, 23)]                 # sizes, draw seeds
    assert all(torch.equal(t, w) for (_, _, t), w in zip(seen, want))
    kl, attn = induction.oracle_kl(target, 20, batch=16, attention=True)
    assert kl == pytest.approx(13.6) and attn == {"layer1_query_m": pytest.approx(27.2)}
    for bad in (dict(n=0), dict(batch=0)):
        with pytest.raises(spd.SPDError, match="must be >= 1"):
            induction.oracle_kl(target, **bad)


def test_oracle_pieces_on_the_committed_target():
    """Why Table 1's Q0 and K0 take several pieces on our target (README): with SPD's stochastic
    masks on every piece that is off, the circuit needs, on these 512 sequences, two directions of
    Q0 at m and two of K0 at s1 (data basis; one: KL > 1e-2) and three of W's singular directions;
    on 8192, where rare sequences count, two of each on at once leave > 1e-3, several times what
    three of each leave (6-50x over four draws of sequences, README); with alpha = 0 where g = 0
    instead, one data direction of each is enough. The bases reproduce W."""
    target = induction.load_or_train_target(COMMITTED_TARGET, log=lambda *a: None)
    kl = lambda basis, draws, **ranks: induction.oracle_kl(target, 512, ranks=ranks, draws=draws, basis=basis)
    wide = lambda **ranks: induction.oracle_kl(target, 8192, ranks=ranks, draws=4, basis="data")
    assert wide(Q0=2, K0=2) > max(1e-3, 3 * wide(Q0=3, K0=3))         # (4.0e-3 and 7.8e-5 here)
    assert abs(kl("data", 0) - kl("svd", 0)) < 1e-6 and kl("svd", 0) < 5e-4   # all d pieces: U V = W
    for m in ("Q0", "K0"):
        assert kl("data", 4, **{m: 1}) > 1e-2 and kl("data", 4, **{m: 2}) < 1e-5
        assert kl("svd", 4, **{m: 2}) > 1e-3 and kl("svd", 4, **{m: 3}) < 1e-5
        assert kl("data", 0, **{m: 1}) < 1e-4
    assert kl("svd", 4, V0=1, Q1=1, K1=1) < 1e-5
    assert kl("svd", 0, Q0=0) > 1e-2                                             # Q0 is needed
    on = lambda *names: induction.oracle_kl(target, 512, everywhere=names)       # whole everywhere:
    assert on() == kl("svd", 0) and on(*induction.MATRICES) < 1e-9               # all six: the target
    assert on("K0") < 2e-5 < on("K1")                # K0 at m is what the circuit's 2e-4 lacks (README)
    with pytest.raises(spd.SPDError, match="everywhere='K0'; name matrices from Q0, K0"):
        induction.oracle_kl(target, 8, everywhere="K0")
    with pytest.raises(spd.SPDError, match="unknown basis"):
        kl("qr", 0)
    with pytest.raises(spd.SPDError, match="attention=True needs draws=0"):
        induction.oracle_kl(target, 8, draws=2, attention=True)

# -----------------------------------------------------------------------------
# CUDA only (skipped elsewhere): the compiled flex-attention path and a full step on the GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S", [16, 64, 200])
def test_flex_equals_math_on_cuda(causal, S):
    """Compiled flex-attention = plain math on CUDA: values and gradients into q, k, v and r."""
    torch.manual_seed(0)
    B, d = 3, 16
    leaves = [torch.randn(B, S, d, device="cuda") for _ in range(3)] + [torch.randn(2 * S - 1, device="cuda")]
    w = torch.randn(B, S, d, device="cuda")
    outs, grads = [], []
    for flex in (True, False):
        xs = [t.clone().requires_grad_() for t in leaves]
        out = spd.ci_attention(*xs, causal=causal, flex=flex)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad for x in xs])
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for name, a, b in zip("qkvr", *grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, (a - b).abs().max().item())


@cuda
def test_training_on_cuda_flex_equals_math_and_lowers_loss():
    """A whole SPD step on CUDA gives the same loss and gradients through flex and plain math,
    and a short run on the GPU lowers the loss and leaves the target unchanged."""
    torch.manual_seed(0)
    target = induction.InductionTransformer().cuda()
    x = induction.make_batch(8, 64, 128, torch.Generator().manual_seed(0), "cuda")[0]
    cfg = spd.Config(C=8, d_gate=4, steps=100, batch_size=8, lr=1e-2, log_every=1000)
    runs = []
    for flex in (False, True):                      # the run below trains the flex one
        torch.manual_seed(0)
        s = spd.SPDModel(target, list(induction.MATRICES.values()), C=8, ci="attention", d_gate=4,
                         max_seq_len=64).cuda()
        for layer in s.layers.values():
            assert isinstance(layer.ci, spd.AttentionCI)   # (flex is the attention CI's; once a vector CI)
            layer.ci.flex = flex
        torch.manual_seed(1)
        loss = spd.training_step(s, x, cfg, 0)[0]
        loss.backward()
        runs.append((loss.item(), [p.grad for p in s.trainable_parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    hist = spd.train(s, cfg, lambda: x, log=lambda *a: None)
    assert hist[-1]["total"] < 0.5 * hist[0]["total"]


# -----------------------------------------------------------------------------
# runs that never lose work: bad input, NaN, unreadable files, resume, Ctrl-C

def snapshot(folder):
    """Every file's bytes, but the empty lock files a run or a target's training leaves (README)."""
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p)) and not p.endswith(".lock")}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished tiny induction run and a tiny-model cache, to be protected from bad input."""
    d = tmp_path_factory.mktemp("runs")
    assert induction.cli(induction_argv(d)) == 0
    torch.manual_seed(0)
    other = induction.InductionTransformer()
    spd.save(spd.SPDModel(other, list(induction.MATRICES.values()), C=8, d_gate=4), str(d / "other_spd.pt"))
    return d


def corrupt(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncate" else b"not a checkpoint at all")


BAD_INDUCTION = {  # case -> (extra argv, expected message, file to break first)
    "C": (["--C=-5"], r"--C=-5 is out of range: it must be >= 1", None),
    "steps": (["--steps=0"], "--steps=0 is out of range", None),
    "lr_negative": (["--lr=-1"], "--lr=-1.0 is out of range: it must be > 0", None),
    "lr_nan": (["--lr=nan"], "--lr=nan is out of range", None),
    "lr_inf": (["--lr=inf"], "--lr=inf is out of range", None),
    "beta": (["--beta_minimality=-1"], "--beta_minimality=-1.0 is out of range", None),
    "p_zero": (["--p_final=0"], r"--p_final=0.0 is out of range: it must be in \(0, 2\]", None),
    "p_big": (["--p_start=3"], "--p_start=3.0 is out of range", None),
    "threshold": (["--threshold=1.5"], r"--threshold=1.5 is out of range: it must be in \[0, 1\)", None),
    "batch": (["--batch_size=0"], "--batch_size=0 is out of range", None),
    "batch_huge": (["--batch_size=1e19"], r"--batch_size=10000000000000000000 is out of range: it must be >= 1 and < 2\*\*31", None),
    "eval_batch_huge": (["--eval_batch=1e30"], "--eval_batch=1000000000000000019884624838656 is out of range", None),
    "ci": (["--ci=foo"], "--ci=foo is out of range: it must be one of scalar, vector, attention", None),
    "optimizer": (["--optimizer=sgd"], "--optimizer=sgd is out of range", None),
    "schedule": (["--lr_schedule=linear"], "--lr_schedule=linear is out of range", None),
    "warmup": (["--lr_warmup=1.5"], "--lr_warmup=1.5 is out of range", None),
    "device": (["--device=tpu"], "--device=tpu is out of range", None),
    "unknown_key": (["--nope=1"], "unknown config key 'nope'", None),
    "bad_type": (["--C=abc"], "--C needs an int", None),
    "preset": (["--preset=huge"], "unknown preset 'huge'", None),
    "nan_run": (["--lr=1e6", "--steps=60", "--out_dir={d}/nan"], r"step \d+: the loss term \w+ is (nan|inf).*lower --lr", None),
    "resume_nothing": (["--resume=true", "--out_dir={d}/empty"], r"no checkpoint to resume at .*checkpoint.pt; run without --resume=true", None),
    "garbage_target": (["--target_path={d}/bad_target.pt", "--out_dir={d}/new"], r"bad_target.pt is not a readable induction target \(UnpicklingError\); pass the right --target_path", "bad_target.pt:garbage"),
    "target_not_ours": (["--target_path={d}/other_spd.pt", "--out_dir={d}/new"], r"other_spd.pt is no induction target: it has no 'state_dict'", None),
    "finished_run": ([], r"holds a finished run \(spd.pt\); pass another --out_dir", None),
    "resume_finished": (["--resume=true"], r"holds a finished run \(spd.pt\); nothing to resume", None),
    "seed_too_big": (["--seed=1e20"], r"--seed=100000000000000000000 is out of range", None),
    "cuda_odd_digit": (["--device=cuda:\u00b2"], r"--device=cuda:\u00b2 is out of range", None),
    "out_dir_is_a_file": (["--out_dir={d}/spd.pt"], r"cannot make the folder .*spd.pt' for --out_dir \(File exists\)", None),
    "target_dir_is_a_file": (["--target_path={d}/spd.pt/t.pt", "--out_dir={d}/new"], r"cannot make the folder .*spd.pt' for --target_path", None),
    "int_not_whole": (["--steps=1.25e1"], r"--steps needs an int, got '1.25e1'", None),
    "int_infinite": (["--seed=1e400"], r"--seed needs an int, got '1e400'", None),
    "threads": ([f"--threads={spd._CPUS + 1}"], rf"--threads={spd._CPUS + 1} is out of range: it must be 0 "
                rf"\(one per core\) to {spd._CPUS}, the cores", None),
    "cuda_missing": (["--device=cuda:64"], r"--device=cuda:64 but there is no such CUDA device; use --device=cpu", None),
    "device_auto_n": (["--device=auto:3"], r"--device=auto:3 is out of range: it must be cpu, cuda, cuda:N or auto", None),
    "two_modes": (["--table1", "--svd-baseline"], r"--table1 and --svd-baseline: one mode at a time", None),
    "unknown_mode": (["--svd_baseline"], r"unknown mode --svd_baseline; modes: --table1", None),
    "two_presets": (["--preset=paper", "--preset=cpu"], r"--preset given 2 times", None),
    "repeated_key": (["--steps=3", "--lr=1", "--steps=4"], r"--steps given 2 times; pass it once", None),
    "truncated_spd": (["--svd-baseline", "--out_dir={d}/cut"], r"spd.pt is not a readable decomposition", "cut/spd.pt:truncate"),
    "spd_other_target": (["--svd-baseline", "--out_dir={d}/foreign"], r"spd.pt was made for a different target", "foreign/spd.pt:other"),
    "bench_missing": (["--bench", "--bench_against={d}/none.py"], r"--bench_against=.*none.py is out of range: it must be an existing spd.py file", None),
    "bench_garbage": (["--bench", "--bench_against={d}/bad_target.pt"], r"bad_target.pt is not an importable spd.py", "bad_target.pt:garbage"),
    "bench_not_spd": (["--bench", "--bench_against={d}/other.py"], r"other.py is not an importable spd.py \(AttributeError\)", "other.py:python"),
    "bench_training_flag": (["--bench", "--C=3"], r"--C does nothing with --bench; it takes --bench_against, --device", None),
    "table2_training_flag": (["--table2", "--preset=paper"], r"--preset does nothing with --table2; it takes --ci_causal, --device", None),
    "target_training_flag": (["--train-target", "--lr=0.5"], r"--lr does nothing with --train-target; it takes --device, --preset, --seed, --target_batch_size", None),
    "svd_threshold": (["--svd-baseline", "--threshold=0.5"], r"--threshold does nothing with --svd-baseline: Figure 2's SPD rows use the thresholds 0, 0.01", None),
    "table1_other_run": (["--table1", "--steps=7"], r"spd.pt was made with --steps=6, not 7: drop --steps, or pass the --out_dir of the run", None),
    "svd_other_run": (["--svd-baseline", "--seed=3"], r"spd.pt was made with --seed=0, not 3", None),
    "table1_missing_target": (["--table1", "--target_path={d}/typo.pt"], r"--target_path=.*typo.pt is not there: a saved run needs the target it was made with", None),
    "resume_nothing_no_target": (["--resume=true", "--out_dir={d}/empty", "--target_path={d}/none.pt"], r"no checkpoint to resume at .*empty/checkpoint.pt", None),
    "resume_missing_target": (["--resume=true", "--out_dir={d}/ck", "--target_path={d}/none.pt"], r"none.pt is not there: a saved run needs the target it was made with", "ck/checkpoint.pt:copy"),
    "bare_key": (["--steps"], r"--steps needs a value: --steps=\.\.\.", None),
    "table1_no_spd": (["--table1", "--out_dir={d}/empty"], r"--table1 reads .*empty/spd.pt, which is not there: pass the --out_dir of your run, or run the decomposition \(without the mode\) first", None),
    "finished_table1_only": (["--out_dir={d}/t1only"], r"t1only holds a finished run \(table1.json\)", "t1only/table1.json:table1"),
    "table1_of_a_table_only": (["--table1", "--out_dir={d}/t1only"], r"t1only/spd.pt, which is not there: it holds table1.json only: run the decomposition again", "t1only/table1.json:table1"),
    "unfinished_target": (["--target_path={d}/half.pt", "--out_dir={d}/new"], r"half.pt is an unfinished target \(step 5\): finish it with --train-target", "half.pt:unfinished"),
    "half_target_other_recipe": (["--train-target", "--target_path={d}/half.pt", "--target_lr=0.05"], r"half.pt is a target half-trained with --target_lr=0.01, not 0.05", "half.pt:unfinished"),
    "target_path_folder": (["--target_path={d}/newtarget/"], r"--target_path=.*newtarget/ is out of range: it must be a file's path, not a folder", None),
    "finished_target": (["--train-target", "--target_path={d}/target.pt"], r"target.pt holds a finished target; pass another --target_path", None),
    "figure5_no_curve": (["--figure5"], r"target.pt has no loss curve: it was trained before train_target recorded one .*; make one with python induction.py --preset=paper --train-target", None),
    "figure5_no_target": (["--figure5", "--target_path={d}/none.pt"], r"none.pt is not there: --figure5 reads the loss curve that --train-target saves in it", None),
    "figure5_training_flag": (["--figure5", "--seed=3"], r"--seed does nothing with --figure5; it takes --out_dir, --target_path", None),
    "half_target_no_steps_left": (["--train-target", "--target_path={d}/half.pt", "--target_steps=3"], r"half.pt is at step 5 already: pass a --target_steps above it", "half.pt:unfinished"),
}


@pytest.mark.parametrize("case", BAD_INDUCTION)
def test_bad_input_never_loses_work(case, finished_runs, capsys):
    d = finished_runs
    extra, message, breaks = BAD_INDUCTION[case]
    if breaks:
        name, how = breaks.split(":")
        os.makedirs(os.path.dirname(d / name), exist_ok=True)
        if how == "other":
            shutil.copy(d / "other_spd.pt", d / name)
        elif how == "python":
            (d / name).write_text("x = 1\n")
        elif how == "copy":                                    # a file in place of a checkpoint
            shutil.copy(d / "spd.pt", d / name)
        elif how == "table1":                                  # a finished run's table, no spd.pt
            shutil.copy(d / "table1.json", d / name)
        elif how == "unfinished":                              # a target trained 5 steps, then stopped
            recipe = dict(batch_size=32, lr=0.01, weight_decay=0.01, warmup=100, seed=0)
            torch.save({**torch.load(d / "target.pt"), "step": 5, "optimizer": {}, "recipe": recipe}, d / name)
        else:
            if not (d / name).exists():
                shutil.copy(d / ("spd.pt" if "spd" in name else "target.pt"), d / name)
            corrupt(d / name, how)
    before = {sub: snapshot(d / sub) for sub in ["", "cut", "foreign"] if (d / sub).exists()}
    extra = [e.format(d=d) for e in extra]
    code = induction.cli(induction_argv(d, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert {sub: snapshot(d / sub) for sub in before} == before      # nothing written or overwritten


@pytest.mark.parametrize("extra, message", [
    (["--C=0"], "--C=0 is out of range"), (["--threshold=-0.1"], "--threshold=-0.1 is out of range"),
    (["--batch_size=3"], "--batch_size must be a multiple of 2"), (["--steps=-1"], "--steps=-1 is out of range"),
    (["--last_token_only=true"], "the facts are right-padded"),
    (["--trace_window=0"], "--trace_window=0 is out of range: it must be >= 1"),
    (["--trace_samples=1e10"], "--trace_samples=10000000000 is out of range"),
    (["--trace_noise=nan"], "--trace_noise=nan is out of range: it must be >= 0 and finite"),
    ([f"--threads={spd._CPUS + 1}", "--steps=1", "--save=false"],
     f"--threads={spd._CPUS + 1} is out of range: it must be 0 (one per core) to {spd._CPUS}"),
])
def test_facts_bad_config(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:             # (a check that regressed: a short run, in tmp_path)
        gpt2_facts.main(["--model=tiny", f"--out_dir={tmp_path}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_resume_command_spells_out_the_command():
    """After Ctrl-C the error names the whole command that continues the run: the run's own
    settings (quoted for a shell), one --resume=true, nothing else changed."""
    e = spd.SPDError("interrupted after step 3; saved d/checkpoint.pt: continue with --resume=true")
    said = spd.resume_command(e, "induction.py", ["--steps=5", "--out_dir=a  b", "--resume=true"])
    assert said == ("interrupted after step 3; saved d/checkpoint.pt: continue with: python induction.py "
                    "--steps=5 '--out_dir=a  b' --resume=true")
    assert spd.resume_command(e, "induction.py", []).endswith("continue with: python induction.py --resume=true")
    assert spd.resume_command(spd.SPDError("no such file"), "induction.py", ["--C=4"]) == "no such file"


def test_home_paths_are_expanded():
    """`--out_dir=~/x` reaches the program unexpanded (a shell expands ~ only at a word's start):
    it means the home folder, not a folder named ~ in the current one."""
    cfg = spd.apply_overrides(induction.InductionConfig(), ["--out_dir=~/runs/a", "--target_path=a~/t.pt"])
    assert cfg.out_dir == os.path.join(os.path.expanduser("~"), "runs/a") and cfg.target_path == "a~/t.pt"
    assert spd.apply_overrides(induction.InductionConfig(), ["--out_dir=~"]).out_dir == os.path.expanduser("~")


def test_int_flags_take_whole_numbers_only():
    cfg = spd.apply_overrides(spd.Config(), ["--steps=1e4", "--seed=1E1", "--C=7"])
    assert (cfg.steps, cfg.seed, cfg.C) == (10_000, 10, 7)
    for bad in ["1.5e0", "1e400", "1e-3", "2.5"]:
        with pytest.raises(spd.SPDError, match=f"--steps needs an int, got '{bad}'"):
            spd.apply_overrides(spd.Config(), [f"--steps={bad}"])


def test_decomposition_is_saved_before_table1(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or any failure) during Table 1 loses nothing: spd.pt is written first."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(induction, "table1", interrupted)
    assert induction.cli(induction_argv(tmp_path)) == 2                  # (as an interrupted training)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: interrupted; {tmp_path}/spd.pt is saved: --table1 with this --out_dir makes Table 1 from it"]
    assert (tmp_path / "spd.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    def too_big(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5e11 bytes")
    monkeypatch.setattr(induction, "table1", too_big)
    assert induction.cli(induction_argv(tmp_path, "--table1", "--eval_batch=1e9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (DefaultCPUAllocator") and \
        "--C, --d_gate or --n_mask_samples (a new run) or --eval_batch" in err[0], err
    def bug(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(induction, "table1", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):   # a bug is not hidden
        induction.cli(induction_argv(tmp_path, "--table1"))
    monkeypatch.undo()
    r = induction.main(induction_argv(tmp_path, "--table1"))      # and Table 1 can be made again
    assert set(r["active"]) == set(induction.MATRICES)


def test_figure2_always_gives_its_verdict():
    """The last line of Figure 2 compares SPD and SVD at KL <= 0.01, or says which never gets there."""
    spd_row = lambda kl, pieces: dict(threshold=0.1, pieces=pieces, kl=kl, pieces_per_position=1.0)
    r = dict(eval_sequences=8, full_rank=96, svd=[dict(tau=0.01, pieces=22, kl=0.009)],
             spd=[spd_row(0.5, 3.0), spd_row(0.008, 17.8)])
    lines = []
    induction.print_figure2(r, log=lines.append)
    assert lines[-1] == "  at KL <= 0.01: SPD uses 17.8 active pieces per example, SVD keeps 22: SPD is more minimal"
    r["spd"] = r["spd"][:1]
    induction.print_figure2(r, log=lines.append)
    assert lines[-1] == "  at KL <= 0.01: no verdict, SPD never reaches it"
    r["svd"][0]["kl"] = 0.2
    induction.print_figure2(r, log=lines.append)
    assert lines[-1] == "  at KL <= 0.01: no verdict, SPD and SVD never reach it"


def test_scripts_print_help(capsys):
    """--help: the docstring, then every setting with the default preset's value."""
    for script, argv, config, example, value in [
            (induction, ["--help"], induction.InductionConfig, "python induction.py --svd-baseline", "--steps=10000"),
            (gpt2_facts, ["-h"], gpt2_facts.FactsConfig, "python gpt2_facts.py --model=tiny", "--trace_window=10")]:
        script.main(argv)
        doc, settings = capsys.readouterr().out.split("Settings, --key=value")
        assert example in doc and value in settings
        assert re.findall(r"--(\w+)=", settings) == [f.name for f in dataclasses.fields(config)]



def test_scripts_end_quietly_when_their_reader_stops():
    """`python induction.py --help | head -1`: the reader closes the pipe before the script
    writes; the script ends with status 1 and no traceback (it printed BrokenPipeError's)."""
    for script in ("induction.py", "gpt2_facts.py"):
        read, write = os.pipe()
        os.close(read)                                        # (closed first: every write fails)
        p = subprocess.run([sys.executable, script, "--help"], cwd=HERE, stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120)
        os.close(write)
        assert p.returncode == 1 and p.stderr == "", (script, p.stderr[-300:])


def test_facts_refuses_a_finished_run_and_reads_auto(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        gpt2_facts.main(["--model=tiny", f"--out_dir={tmp_path}", f"--tiny_path={tmp_path}/t.pt"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds an earlier run's results.json" in err
    assert (tmp_path / "results.json").read_text() == "{}" and not (tmp_path / "t.pt").exists()
    with pytest.raises(SystemExit):
        gpt2_facts.main(["--model=tiny", f"--out_dir={tmp_path}", "--resume=true"])
    assert "no checkpoint to resume in" in capsys.readouterr().err
    assert gpt2_facts.parse_config(["--model=tiny", "--device=auto"]).device in ("cpu", "cuda")
    with spd._locked(str(tmp_path / "o" / "checkpoint.pt")):             # (another run, in o)
        with pytest.raises(SystemExit):
            gpt2_facts.main(["--model=tiny", f"--out_dir={tmp_path}/o", f"--tiny_path={tmp_path}/t.pt"])
        assert "another run is using" in capsys.readouterr().err
    for name in ("spd.pt", "results.json"):                              # its own outputs: refused
        with pytest.raises(SystemExit):
            gpt2_facts.main(["--model=tiny", f"--out_dir={tmp_path}/o", f"--tiny_path={tmp_path}/o/{name}"])
        assert f"--tiny_path={tmp_path}/o/{name} is where this run writes its results" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists() and sorted(os.listdir(tmp_path / "o")) == ["checkpoint.pt.lock"]


def test_facts_garbage_tiny_cache(tmp_path, capsys):
    bad = tmp_path / "tiny.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        gpt2_facts.main(["--model=tiny", f"--tiny_path={bad}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "tiny.pt is not a readable tiny model cache" in err
    assert bad.read_bytes() == b"garbage"
    torch.save({"model": {}, "config": {"note": "my own model"}}, bad)  # a file of another program
    before = bad.read_bytes()
    with pytest.raises(SystemExit):
        gpt2_facts.main(["--model=tiny", f"--tiny_path={bad}", f"--out_dir={tmp_path}"])
    assert "tiny.pt is no tiny model cache: it has no 'sentences'" in capsys.readouterr().err
    assert bad.read_bytes() == before                                  # not retrained over
    for folder in [f"{tmp_path}/new/", str(tmp_path)]:                 # a folder: before any training
        with pytest.raises(SystemExit):
            gpt2_facts.main(["--model=tiny", f"--tiny_path={folder}", f"--out_dir={tmp_path}/o"])
        assert "must be a file's path, not a folder" in capsys.readouterr().err
    assert not os.path.exists(f"{tmp_path}/new")


def test_every_config_field_has_a_rule():
    for cfg, rules in [(spd.Config(), spd.CONFIG_RULES), (induction.InductionConfig(), induction.RULES),
                       (gpt2_facts.FactsConfig(), gpt2_facts.RULES)]:
        assert {f.name for f in dataclasses.fields(cfg) if f.type not in (bool, "bool")} <= set(rules)
        spd.check_config(cfg, rules)                                  # the defaults are allowed


def test_resume_restores_the_cuda_rng_of_the_gpus_there_are(tmp_path, monkeypatch):
    """A checkpoint saved with more GPUs than the machine has restores the states of those it has
    (torch's set_rng_state_all would fail on the extra ones); without CUDA none."""
    s = spd.SPDModel(tiny(), "blocks.0.attn.q_proj", C=2, ci="vector", d_gate=2)
    cfg = config_for(s, steps=3)
    opt = spd.make_optimizer(s, cfg)
    spd.save_checkpoint(str(tmp_path / "c.pt"), s, opt, cfg, 1, [])
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["cuda_rng"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(3)]   # saved on 3 GPUs
    torch.save(ckpt, tmp_path / "c.pt")
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append((int(state[0]), i)))
    for gpus, expect in [(0, []), (1, [(0, 0)]), (2, [(0, 0), (1, 1)])]:
        restored.clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        assert spd.load_checkpoint(str(tmp_path / "c.pt"), s, opt, cfg)[0] == 1
        assert restored == expect


def test_resume_is_exact_and_checked(tmp_path, ctrl_c_fails):
    """Interrupt at step 7 (SIGINT from inside), resume: bit-identical to an unbroken run."""
    import signal
    path = str(tmp_path / "ckpt.pt")
    cfg = spd.Config(C=6, ci="attention", d_gate=4, steps=15, lr=1e-2, log_every=5, checkpoint_every=4,
                     beta_stochastic_partial_recon=1, last_token_only=False)

    def run(cfg, interrupt_at=None, seed=0, with_rng=True):
        target = tiny()
        torch.manual_seed(seed)                                        # (U, V and the CI's init)
        s = spd.SPDModel(target, "blocks.*.attn.*", C=6, ci="attention", d_gate=4, max_seq_len=6,
                         causal=cfg.ci_causal)
        gen, calls = torch.Generator().manual_seed(seed), []

        def batch():
            calls.append(1)
            if len(calls) == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return torch.randint(0, 11, (8, 6), generator=gen)
        hist = spd.train(s, cfg, batch, log=lambda *a: None, checkpoint=path,
                         data_rng=gen if with_rng else None)
        return s, hist, calls

    whole, hist, _ = run(cfg)
    os.remove(path)                                                    # the last periodic checkpoint
    with pytest.raises(spd.SPDError, match="interrupted after step 7; saved .*--resume=true"):
        run(cfg, interrupt_at=8)
    assert torch.load(path, weights_only=True)["step"] == 8
    with pytest.raises(spd.SPDError, match="holds an unfinished run"):
        run(cfg)
    with pytest.raises(spd.SPDError, match="saved with --lr=0.01, not 0.02"):
        run(dataclasses.replace(cfg, resume=True, lr=2e-2))
    with pytest.raises(spd.SPDError, match="ckpt.pt was saved with --ci_causal=True, not False: resume "
                                           "with the same config, or delete it to start again"):
        run(dataclasses.replace(cfg, resume=True, ci_causal=False))    # (a model built otherwise)
    with pytest.raises(spd.SPDError, match="ckpt.pt was saved with a data_rng; resume as it ran"):
        run(dataclasses.replace(cfg, resume=True), with_rng=False)     # (its batches would differ)
    # other seeds for the model's init and the data: only what the checkpoint restores can match
    resumed, hist2, calls = run(dataclasses.replace(cfg, resume=True, checkpoint_every=3), seed=1)  # (RUN_ONLY)
    for (n, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert [h["total"] for h in hist2] == [h["total"] for h in hist]
    assert len(calls) == 15 - 8                                        # steps 8-14, not 0-14
    opt = spd.make_optimizer(resumed, cfg)
    spd.save_checkpoint(path, resumed, opt, cfg, 3, [], data_rng=None)
    with pytest.raises(spd.SPDError, match="ckpt.pt was saved without a data_rng; resume as it ran"):
        spd.load_checkpoint(path, resumed, opt, cfg, torch.Generator())



def test_a_users_own_model_mistakes_are_one_line_errors(tmp_path):
    """What a researcher trying spd.py on a model of their own ran into (a walkthrough): masks for
    other positions or rows than the model is given, a model whose decomposed layer sees its input
    transposed or flattened, a pattern list with spaces, a config that is a dict."""
    s = spd.SPDModel(tiny(), "blocks.*.attn.q_proj, blocks.0.attn.k_proj, ", C=3, ci="vector", d_gate=2)
    assert list(s.layers) == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "blocks.0.attn.k_proj"]
    x = torch.randint(0, 11, (2, 6))
    g = spd.causal_importances(s, x)
    with s.masked(g) as model:                                 # the same positions: as s(x, g)
        assert torch.equal(model(x), s(x, g))
    for masks, given in [(g, x[:, :4]), (g, x[:, :1]),         # masks of 6 positions, 4 or 1 given
                         ({n: v.repeat(2, 1, 1) for n, v in g.items()}, x)]:   # 2B rows for B
        with pytest.raises(spd.SPDError, match=r"layer 'blocks.0.attn.q_proj' got an input \(\d+, \d, 8\) "
                                               r"under a mask \(\d, 6, 3\): masks are \(B, S, C\) for inputs"):
            with s.masked(masks) as model:
                model(given)

    class Transposed(Tiny):                                    # runs its layers on (S, B, d)
        def forward(self, t):
            return self.blocks[0].attn.q_proj(self.embed(t).transpose(0, 1)).transpose(0, 1) @ \
                self.unembed.weight.T

    class Flat(Tiny):                                          # runs its layers on (B·S, d)
        def forward(self, t):
            return (self.blocks[0].attn.q_proj(self.embed(t).flatten(0, 1)) @ self.unembed.weight.T
                    ).view(*t.shape, -1)

    class Longer(Tiny):                                        # runs its layers on (B, S + 1, d)
        def forward(self, t):
            x = torch.cat([self.embed(t), self.pos[:1].expand(len(t), 1, -1)], 1)
            return (self.blocks[0].attn.q_proj(x) @ self.unembed.weight.T)[:, 1:]

    for model, shape in [(Transposed(), "(6, 2, 8)"), (Flat(), "(12, 8)"), (Longer(), "(2, 7, 8)")]:
        for ci in ("vector", "attention"):
            bad = spd.SPDModel(model, "blocks.0.attn.q_proj", C=3, ci=ci, d_gate=2, max_seq_len=6)
            with pytest.raises(spd.SPDError, match=re.escape(
                    f"layer 'blocks.0.attn.q_proj' got an input {shape} from tokens (2, 6): SPD needs each "
                    f"decomposed layer's input as (B, S, d_in), batch first like the tokens")):
                spd.causal_importances(bad, x)
    with pytest.raises(spd.SPDError, match=r"cfg must be a spd.Config \(or a dataclass derived from it\), "
                                           r"got a dict: e.g. spd.Config\(\*\*d\)"):
        spd.train(s, {"C": 3}, lambda: x)
    spd.save(s, tmp_path / "s.pt", config_for(s))
    other = tiny()
    other.blocks[0].attn.k_proj = nn.Identity()
    with pytest.raises(spd.SPDError, match=r"made for a different target: 'blocks.0.attn.k_proj' is a "
                                           r"module of type Identity here, not a Linear or Conv1D"):
        spd.load(tmp_path / "s.pt", other)

def test_run_only_fields_exist():
    """Each config's RUN_ONLY (the fields a resumed run may change) names fields it has."""
    for config in (spd.Config, induction.InductionConfig, gpt2_facts.FactsConfig):
        assert config.RUN_ONLY <= {f.name for f in dataclasses.fields(config)}, config


def test_ctrl_c_then_resume(tmp_path, capsys):
    """SIGINT to a running `python induction.py`, then --resume=true: the same decomposition."""
    import signal
    flags = "--steps=300", "--log_every=1", "--checkpoint_every=0"
    argv = induction_argv(tmp_path, *flags)
    assert induction.cli(induction_argv(tmp_path, *flags, f"--out_dir={tmp_path}/whole")) == 0  # trains the target
    proc = subprocess.Popen([sys.executable, "induction.py", *argv], cwd=os.path.dirname(
        os.path.abspath(__file__)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step      3 |"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.strip().startswith("error: interrupted after step"), err
    said = re.search(r"continue with: python induction.py (.*)$", err.strip())     # the command to type
    assert said and shlex.split(said[1]) == argv + ["--resume=true"], err
    assert "Traceback" not in err and (tmp_path / "checkpoint.pt").exists()
    n = int(re.search(r"interrupted after step (\d+)", err).group(1))
    capsys.readouterr()
    assert induction.cli(induction_argv(tmp_path, *flags, "--resume=true", "--eval_batch=16")) == 0  # (evaluation only)
    out = capsys.readouterr().out
    assert f"resumed {tmp_path}/checkpoint.pt at step {n + 1}\n" in out                 # (not at 0)
    assert "\nL0 below: the mean number of subcomponents with g > 0 per position, for " + ", ".join(
        induction.MATRICES.values()) + "\n" in out                    # (which column is which)
    assert not (tmp_path / "checkpoint.pt").exists()
    a = torch.load(tmp_path / "spd.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "whole" / "spd.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_format_version_is_a_one_line_error(tmp_path):
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.q_proj", C=4)
    spd.save(s, str(tmp_path / "s.pt"))
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert ckpt["format"] == spd.FORMAT and not list(tmp_path.glob("s.tmp*"))   # renamed into place
    torch.save({**ckpt, "format": spd.FORMAT + 1}, tmp_path / "s.pt")
    with pytest.raises(spd.SPDError, match=f"has format {spd.FORMAT + 1}, this code reads {spd.FORMAT}"):
        spd.load(str(tmp_path / "s.pt"), m)


def test_a_save_that_dies_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    m = tiny()
    s = spd.SPDModel(m, "blocks.*.attn.q_proj", C=4)
    spd.save(s, str(tmp_path / "s.pt"))
    before = (tmp_path / "s.pt").read_bytes()
    def dies(obj, f):                                                  # half a file, then the end
        pathlib.Path(f).write_bytes(b"PK half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        spd.save(s, str(tmp_path / "s.pt"))
    assert (tmp_path / "s.pt").read_bytes() == before


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class TinyMLP(Tiny):
    """Tiny with an MLP in each block: the module names of the README's API example."""

    def __init__(self):
        super().__init__()
        for b in self.blocks:
            b.mlp = MLP(8)

    def forward(self, t):
        x, p = self.embed(t), self.pos[: t.shape[1]]
        for b in self.blocks:
            x = x + b.attn(x, p)
            x = x + b.mlp(x)
        return self.unembed(x)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Using spd.py on your own model" block, only its step count cut."""
    text = pathlib.Path(HERE, "README.md").read_text()
    code = text.split("Using `spd.py` on your own model:")[1].split("```python\n")[1].split("```")[0]
    assert "steps=10_000," in code
    code = code.replace("steps=10_000,", "steps=2, log_every=1,")
    torch.manual_seed(0)
    env = {"model": TinyMLP(), "next_batch": lambda: torch.randint(0, 11, (4, 6)),
           "tokens": torch.randint(0, 11, (3, 6))}
    monkeypatch.chdir(tmp_path)
    exec(code, env)
    assert env["g"]["blocks.0.mlp.fc"].shape == (3, 6, 100) and env["saved"]["steps"] == 2
    assert env["saved"]["last_token_only"] is False
    assert isinstance(env["edited"], TinyMLP) and (tmp_path / "spd.pt").exists()


def test_ctrl_c_while_training_a_target_saves_it_and_the_same_call_continues(tmp_path, monkeypatch,
                                                                             ctrl_c_fails):
    import signal
    make_batch, calls, at = induction.make_batch, [], []

    def batch(*a, **kw):
        calls.append(1)
        if len(calls) in at:
            signal.raise_signal(signal.SIGINT)              # Ctrl-C during that step
        return make_batch(*a, **kw)
    monkeypatch.setattr(induction, "make_batch", batch)
    path, kw = str(tmp_path / "t.pt"), dict(steps=5, batch_size=8, eval_every=100, target_acc=None)
    at[:] = [3]
    with pytest.raises(spd.SPDError, match=r"interrupted after step 3; saved .*t.pt: the same command continues it"):
        induction.train_target(save_path=path, log=lambda *a: None, **kw)
    saved = induction.read_target(path)[1]
    assert saved["step"] == 3 and "optimizer" in saved
    printed, calls[:], at[:] = [], [], [2]              # step 5, the last: it finishes instead
    induction.train_target(save_path=path, log=printed.append, **kw)
    saved = induction.read_target(path)[1]
    assert printed[0].endswith("from step 4") and saved["step"] == 5 and "optimizer" not in saved
    calls[:], at[:] = [], [1]
    with pytest.raises(spd.SPDError, match=r"interrupted after step 1; nothing saved: run again"):
        induction.train_target(log=lambda *a: None, **kw)


def test_facts_bad_patterns_fail_before_any_work(tmp_path, monkeypatch, capsys):
    """A --patterns or --edit_patterns that names no layer fails as soon as the model is there,
    not after Figure 9 (the tiny model's ~40 s of training come before, and are cached)."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50))
    monkeypatch.setattr(gpt2_facts, "load_model", lambda *a: (model, None))
    for bad, says in [(["--patterns=nothing.*"], "matches no module"),
                      (["--patterns=transformer.h.0.mlp.c_*", "--edit_patterns=transformer.h.0.attn.c_attn"],
                       "which --patterns does not decompose")]:
        with pytest.raises(SystemExit) as e:
            gpt2_facts.main(["--model=tiny", *bad, f"--out_dir={tmp_path}", "--threads=1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err

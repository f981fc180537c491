"""
Stochastic Parameter Decomposition (SPD) for transformers, in one file.

Reference implementation of "Decomposition of Small Transformer Models" (Christensen & Riggs
Smith, arXiv 2511.08854), which extends SPD (Bushnaq, Braun & Sharkey, arXiv 2506.20790) to
sequence models. Read it beside the paper; each section cites the equation it implements.

  1. Decomposed layers         W ≈ U V, rank-1 subcomponents                      Eq. 1
  2. Decomposing a model       run as target, fully masked, or partly replaced   Eq. 2, 3, 5, 6
  3. Causal importance         scalar, vector and attention γ-functions          Eq. 4, Alg. 1
  4. Leaky hard sigmoids and stochastic masks  α = g + (1 - g) u                 Sec. 4
  5. Losses                    faithfulness, minimality, six reconstructions     Eq. 1, 2, 3, 5, 6
  6. Training step and loop                                                      Alg. 3
  7. Save / load
  8. Measures                  causal importances, L0
  9. Plumbing (not the method): command-line configs, checks, locks, atomic files

Dimensions: B batch, S sequence, C subcomponents per matrix, d_in/d_out a layer's input/output
width, H = D_gate the hidden width of each γ_c MLP, K the number of mask sets stacked along the
batch dimension so that many masked forwards run as one.

Left out: what the paper does not use (other CI variants, distributed training, tracking), and
Sec. 5.2's orthogonal projection of subcomponents, which is in gpt2_facts.py beside its use.
Run `python induction.py` (Table 1) or `python gpt2_facts.py --model=tiny`. Needs torch, numpy, tqdm.
"""
import contextlib
import copy
import ctypes
import dataclasses
import fnmatch
import hashlib
import json
import math
import numbers
import os
import shlex
import sys
import textwrap
import threading
import time
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F


class SPDError(Exception):
    """A one-line error about the user's input (scripts print it without a traceback)."""


# -----------------------------------------------------------------------------
# 1. Decomposed layers (Eq. 1): W ≈ U V = Σ_c U[:, c] V[c, :]

def layer_weight(module):
    """The weight W of a Linear or GPT-2 Conv1D as (d_out, d_in); Conv1D stores (d_in, d_out), so
    for it a transposed view (writing into the result writes the module's weight)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D, y = x W + b
        return module.weight.T
    raise SPDError(f"cannot decompose a {type(module).__name__}: only nn.Linear and GPT-2 Conv1D")


class DecomposedLayer(nn.Module):
    """C rank-1 subcomponents of one frozen target layer, W ≈ U V (Eq. 1).

    V (C, d_in) reads the input, U (d_out, C) writes the output. With a mask alpha (..., C):
        y = U (alpha ⊙ (V x)) + b        (b: the target's bias, frozen)
    Init: V ~ N(0, 1/d_in), U ~ N(0, 1/C), random as in SPD; the faithfulness loss pulls U V
    onto W. Without a mask set the layer runs the target itself; it holds its own CI `ci`."""

    def __init__(self, target, C, ci):
        super().__init__()
        self.target = target
        d_out, d_in = layer_weight(target).shape
        self.V = nn.Parameter(torch.randn(C, d_in) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(d_out, C) / math.sqrt(C))
        self.ci = ci
        self.mask = None      # (alpha (N, S, C), rows (N,) or None for all rows, final_only), per forward
        self.name = None      # its name in the model (for messages)
        self.inputs = None    # while target_forward runs, a list of the inputs it was called with

    @property
    def W(self):
        return layer_weight(self.target)  # (d_out, d_in)

    def components(self, x, alpha):
        inner = x @ self.V.T                      # (N, S, C)  V_c x
        y = (inner * alpha) @ self.U.T            # (N, S, d_out)
        return y if self.target.bias is None else y + self.target.bias

    def forward(self, x):                         # x (N, S, d_in)
        if self.inputs is not None:
            self.inputs.append(x)
        if self.mask is None:
            return self.target(x)
        alpha, rows, final_only = self.mask
        if final_only and x.dim() > 2 and x.shape[-2] == 1:     # the model runs its final position
            alpha = alpha[..., -1:, :]                          # only (e.g. the last layer's query)
        if x.dim() < 3 or alpha.shape[:2] != (len(x) if rows is None else len(rows), x.shape[1]):
            raise SPDError(f"layer {self.name!r} got an input {tuple(x.shape)} under a mask "
                           f"{tuple(alpha.shape)}: masks are (B, S, C) for inputs (B, S, d_in), "
                           f"the sequences the model is given")
        if rows is None:                          # every row uses the subcomponents
            return self.components(x, alpha)
        y = self.target(x)                        # other rows keep the target weight
        return y.index_copy(0, rows, self.components(x[rows], alpha))


# -----------------------------------------------------------------------------
# 2. Decomposing a model

def match_modules(model, patterns):
    """Names of the modules matching glob patterns such as 'blocks.*.attn.q_proj'."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise SPDError("no module patterns: name the layers to decompose, e.g. 'blocks.*.attn.q_proj'")
    torch_own = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    read_only = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, torch_own)
                 for c, _ in m.named_children()}              # (they read their Linears' weights)
    decomposable = [n for n, m in model.named_modules() if n not in read_only
                    and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    names = []
    for p in patterns:
        hits = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, p)]
        if not hits:
            raise SPDError(f"pattern {p!r} matches no module; decomposable modules: "
                           f"{_short(decomposable)}")
        bad = [n for n in hits if n not in decomposable]
        if bad:
            raise SPDError(f"pattern {p!r} matches {bad[0]!r}, a "
                           f"{type(model.get_submodule(bad[0])).__name__}, which cannot be decomposed "
                           f"(only Linear/Conv1D that the model calls; torch's own attention and "
                           f"Transformer layers read their weights); it matched {_short(hits)}")
        names += [n for n in hits if n not in names]
    aliases = {}                                              # one module under several names
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    for n in names:
        also = [a for a in aliases[id(model.get_submodule(n))] if a != n]
        if also:
            raise SPDError(f"{n!r} is also registered as {also[0]!r}: SPD decomposes a layer "
                           f"with one name, called once per forward; give each use its own copy")
    return names


def _short(names, n=8):
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


class SPDModel(nn.Module):
    """A frozen copy of the target with the chosen layers replaced by DecomposedLayers.

    model(x)                 -> the target's logits (no mask set: every layer is the target)
    model(x, {name: alpha})  -> logits with the named layers masked, the others the target
    model.run_mask_sets(x, [masks_1, ..., masks_K]) -> all K variants in one batched forward.
    The caller's model is deep-copied and never changed; only U, V and the CI functions train.
    final_only_kwargs: the model's arguments for the final position's logits only (e.g.
    {"logits_to_keep": 1} in transformers), used by the losses on the final position."""

    def __init__(self, target, patterns, C, ci="vector", d_gate=16, max_seq_len=None,
                 causal=True, final_only_kwargs=None):
        super().__init__()
        whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v < 2**31
        if not (whole(C) and whole(d_gate) and (max_seq_len is None or whole(max_seq_len))
                and causal in (True, False)):
            raise SPDError(f"C, d_gate and max_seq_len (if given) must be integers >= 1 (and < 2**31) "
                           f"and causal a bool, got C={C!r}, d_gate={d_gate!r}, "
                           f"max_seq_len={max_seq_len!r}, causal={causal!r}")
        C, d_gate, causal = int(C), int(d_gate), bool(causal)   # (numpy's: a file holds plain ones)
        max_seq_len = max_seq_len if max_seq_len is None else int(max_seq_len)
        self.model = copy.deepcopy(target).eval().requires_grad_(False)
        self.spec = dict(patterns=match_modules(self.model, patterns), C=C, ci=ci,
                         d_gate=d_gate, max_seq_len=max_seq_len, causal=causal,
                         final_only_kwargs=final_only_kwargs)
        self.layers = {}   # name -> DecomposedLayer (also registered inside self.model)
        for name in self.spec["patterns"]:
            module = self.model.get_submodule(name)
            W = layer_weight(module)                   # U, V and γ take W's device and dtype
            ci_fn = make_ci(ci, W.shape[1], C, d_gate, max_seq_len, causal)
            self.layers[name] = DecomposedLayer(module, C, ci_fn).to(W.device, W.dtype)
            self.model.set_submodule(name, self.layers[name])
            self.layers[name].name = name

    def forward(self, x, masks=None):
        return self.run_mask_sets(x, [masks or {}])[0]

    def run_mask_sets(self, x, mask_sets, final_only=False):
        """f(x | masks_k) for k = 1..K in one forward of the batch repeated K times.

        mask_sets[k] maps layer names to alpha (B, S, C); a layer absent from a set keeps the
        target weight in that set's rows (the layerwise and partial losses need this).
        Returns logits (K, B, S, vocab), or (K, B, vocab) of the final position if final_only."""
        K, B, M = len(mask_sets), x.shape[0], self.spec["max_seq_len"]
        if M and x.dim() > 1 and x.shape[1] > M:
            raise SPDError(f"sequences of {x.shape[1]} positions, but this SPDModel was built with "
                           f"max_seq_len={M}: pass shorter ones")
        if not (isinstance(mask_sets, (list, tuple)) and all(isinstance(m, dict) and all(
                torch.is_tensor(a) for a in m.values()) for m in mask_sets)):
            raise SPDError("masks must be a dict {layer name: alpha (B, S, C) tensor} (run_mask_sets: "
                           "a list of such dicts)")
        bad = next((a for m in mask_sets for a in m.values() if a.shape[:2] != (B, x.shape[1])), None)
        if bad is not None:
            raise SPDError(f"a mask has shape {tuple(bad.shape)}; masks are (B, S, C) = "
                           f"({B}, {x.shape[1]}, C)")
        stacked = {}                                  # (unknown names: masked() says so)
        for name in dict.fromkeys(n for m in mask_sets for n in m):
            ks = [k for k, m in enumerate(mask_sets) if name in m]
            alpha = torch.cat([mask_sets[k][name] for k in ks])                  # (len(ks)·B, S, C)
            rows = None if len(ks) == K else (
                torch.tensor(ks, device=x.device)[:, None] * B
                + torch.arange(B, device=x.device)).flatten()                     # (len(ks)·B,)
            stacked[name] = (alpha, rows)
        kwargs = (self.spec["final_only_kwargs"] or {}) if final_only else {}
        with self.masked(stacked, final_only):
            out = self.model(x.repeat(K, *[1] * (x.dim() - 1)), **kwargs)
        out = getattr(out, "logits", out)             # (K·B, S, V); transformers returns an object
        if not torch.is_tensor(out) or out.dim() not in ((2, 3) if final_only else (3,)):
            got = f"a tensor {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
            raise SPDError(f"the model returned {got}; SPDModel needs logits (B, S, vocab), or an "
                           f"object with .logits: wrap the model so that forward returns them")
        if final_only and out.dim() == 3:
            out = out[:, -1]                                                      # (K·B, V)
        return out.view(K, B, *out.shape[1:])

    @contextlib.contextmanager
    def masked(self, masks, final_only=False):
        """Inside, self.model(...) runs with {name: alpha} (or {name: (alpha, rows)}) set; use it
        to call the model with its own arguments, e.g. to read attention patterns. final_only: a
        layer given one position (the model's final-position path) takes the masks' last one."""
        if not isinstance(masks, dict):
            raise SPDError(f"masks must be a dict {{layer name: alpha}}, got a {type(masks).__name__}")
        unknown = sorted(set(masks) - self.layers.keys())
        if unknown:
            raise SPDError(f"mask for {unknown[0]!r}, which is not decomposed; decomposed: "
                           f"{_short(list(self.layers))}")
        try:
            for name, m in masks.items():
                alpha, rows = m if isinstance(m, tuple) else (m, None)
                if not torch.is_tensor(alpha):
                    raise SPDError(f"mask for {name!r} is a {type(alpha).__name__}; masks are tensors")
                if alpha.shape[-1] != self.spec["C"]:
                    raise SPDError(f"mask for {name!r} has shape {tuple(alpha.shape)}; its last "
                                   f"dimension must be C = {self.spec['C']}")
                U = self.layers[name].U
                if alpha.device != U.device:
                    raise SPDError(f"mask for {name!r} is on {alpha.device}, the decomposition on "
                                   f"{U.device}: pass masks on its device")
                self.layers[name].mask = (alpha.to(U.dtype), rows, final_only)  # (bool, float32: cast)
            yield self.model
        finally:
            for layer in self.layers.values():
                layer.mask = None

    @torch.no_grad()
    def target_forward(self, x):
        """Algorithm 3 step 2: the target's logits and each decomposed layer's input."""
        for layer in self.layers.values():
            layer.inputs = []
        try:
            logits = self(x)
            inputs = {n: layer.inputs for n, layer in self.layers.items()}
        finally:
            for layer in self.layers.values():
                layer.inputs = None
        for n, xs in inputs.items():                  # (else the CI would see one call of several)
            if len(xs) != 1:
                raise SPDError(f"layer {n!r} ran {len(xs)} times in one forward: SPD decomposes a "
                               f"layer that the model calls once" + ("; give each call its own copy"
                                                                      if xs else ""))
            if xs[0].dim() < 3 or xs[0].shape[:2] != x.shape[:2]:   # (its masks are (B, S, C))
                raise SPDError(f"layer {n!r} got an input {tuple(xs[0].shape)} from tokens "
                               f"{tuple(x.shape)}: SPD needs each decomposed layer's input as "
                               f"(B, S, d_in), batch first like the tokens (a model that transposes "
                               f"or flattens them: wrap it, or decompose other layers)")
        return logits, {n: xs[0] for n, xs in inputs.items()}

    def causal_importance(self, inputs):
        """Algorithm 3 step 3: pre-sigmoid causal importances {name: (B, S, C)} from the inputs."""
        return {n: layer.ci(inputs[n], layer.V) for n, layer in self.layers.items()}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# 3. Causal importance: g_c = σ_H(γ_c(input)) in [0, 1]^(B, S, C)   (Sec. 4.1, Eq. 4, Alg. 1)

class GammaMLPs(nn.Module):
    """C independent one-hidden-layer GELU MLPs γ_c, evaluated as a few batched tensor ops: SPD's
    vector and scalar CI functions (the attention CI below feeds them its own input).

    vector (n_in given): γ_c(x) = w2_c · gelu(W1_c x + b1_c) + b2_c on the layer input x ∈ R^n_in;
        the C first layers are stacked in W1 (C·H, n_in), so they are one matmul.
    scalar (n_in None):  γ_c(a_c) = w2_c · gelu(a_c w1_c + b1_c) + b2_c on its own inner
        activation a_c = V_c x (forward is given x and V).
    `reference` is the plain form; on a CPU, forward runs the same function through _ChunkedGamma
    (faster, equal up to rounding; tested in float64), on a GPU and under torch.compile `reference`."""

    def __init__(self, C, H, n_in=None):
        super().__init__()
        self.C, self.H, self.scalar = C, H, n_in is None
        shape = (C, H) if n_in is None else (C * H, n_in)
        self.W1 = nn.Parameter(torch.randn(shape) / math.sqrt(n_in or 1))
        self.b1 = nn.Parameter(torch.zeros(C * H))
        self.W2 = nn.Parameter(torch.randn(C, H) / math.sqrt(H))
        self.b2 = nn.Parameter(torch.zeros(C))
        self.chunked = None                                    # None: by device, as above

    def reference(self, x):                                    # (..., n_in) or (..., C)
        if self.scalar:
            h = x[..., None] * self.W1 + self.b1.view(self.C, self.H)   # (..., C, H)
        else:
            h = F.linear(x, self.W1, self.b1).unflatten(-1, (self.C, self.H))  # (..., C, H)
        return (F.gelu(h) * self.W2).sum(-1) + self.b2          # (..., C)

    def forward(self, x, V=None):                              # x (B, S, n_in or d_in), V (C, d_in)
        if self.scalar:
            x = x @ V.T                                        # (B, S, C) inner activations
        chunked = (not x.is_cuda and not torch.compiler.is_compiling() if self.chunked is None
                   else self.chunked)
        if not chunked:
            return self.reference(x)
        tokens = x.reshape(-1, x.shape[-1])                    # (B·S, n_in or C)
        out = _ChunkedGamma.apply(self.scalar, tokens, self.W1, self.b1, self.W2, self.b2)
        return out.view(*x.shape[:-1], self.C)


class _ChunkedGamma(torch.autograd.Function):
    """GammaMLPs.reference on tokens x (N, n_in) (scalar: (N, C)), a chunk of tokens at a time.

    The hidden layer h (N, C, H) is the big tensor of an SPD step: each chunk of it stays in cache
    from h = W1 x + b1 to the output, and backward recomputes it unless N·C·H <= KEEP, when h and
    gelu(h) are kept (README, "Step time", has the measurements). With ḡ = dL/dγ:
        dL/dw2_c = Σ_n ḡ_nc gelu(h_nc)    dL/dh_nc = ḡ_nc w2_c ⊙ gelu'(h_nc)
        dL/dW1 = (dL/dh)ᵀ x,  dL/db1 = Σ_n dL/dh,  dL/dx = (dL/dh) W1,  dL/db2 = Σ_n ḡ."""
    FLOATS = 2 ** 19                                           # hidden units per chunk (2 MB)
    KEEP = 2 ** 23                      # at most this many hidden units: kept, not recomputed

    @staticmethod
    def hidden(scalar, x, W1, b1, C, H):                       # (n, C, H)
        if scalar:                                             # h_nc = x_nc w1_c + b1_c
            return torch.addcmul(b1.view(C, H), x[:, :, None], W1)
        return torch.addmm(b1, x, W1.T).view(-1, C, H)

    @staticmethod
    def forward(ctx, scalar, x, W1, b1, W2, b2):
        (C, H), R = W2.shape, max(1, _ChunkedGamma.FLOATS // W2.numel())
        out, kept, keep = x.new_empty(len(x), C), [], len(x) * W2.numel() <= _ChunkedGamma.KEEP
        for i in range(0, len(x), R):
            h = _ChunkedGamma.hidden(scalar, x[i:i + R], W1, b1, C, H)
            a = F.gelu(h)
            torch.sum(a * W2, -1, out=out[i:i + R])
            kept += [(h, a)] if keep else []
        ctx.save_for_backward(x, W1, b1, W2)
        ctx.scalar, ctx.rows, ctx.kept = scalar, R, kept
        return out.add_(b2)

    @staticmethod
    def backward(ctx, grad):                                   # grad (N, C)
        x, W1, b1, W2 = ctx.saved_tensors
        (C, H), R = W2.shape, ctx.rows
        kept, ctx.kept = ctx.kept, None
        if torch.is_grad_enabled():     # create_graph: the plain form's gradient, itself differentiable
            h = _ChunkedGamma.hidden(ctx.scalar, x, W1, b1, C, H)
            wrt = [t for t, need in zip((x, W1, b1, W2), ctx.needs_input_grad[1:5]) if need]
            got = iter(torch.autograd.grad((F.gelu(h) * W2).sum(-1), wrt, grad, create_graph=True)
                       if wrt else ())
            return None, *(next(got) if need else None for need in ctx.needs_input_grad[1:5]), grad.sum(0)
        gx, gW1, gb1, gW2 = (torch.zeros_like(t) for t in (x, W1, b1, W2))
        for i in range(0, len(x), R):
            xc, g = x[i:i + R], grad[i:i + R, :, None]        # (n, d), (n, C, 1)
            h, a = kept[i // R] if kept else (_ChunkedGamma.hidden(ctx.scalar, xc, W1, b1, C, H), None)
            gW2 += (F.gelu(h) if a is None else a).mul(g).sum(0)
            gh = torch.ops.aten.gelu_backward(g * W2, h)       # (n, C, H)
            gb1 += gh.sum(0).view(-1)
            if ctx.scalar:
                gW1 += torch.mul(gh, xc[:, :, None]).sum(0)
                torch.sum(gh.mul_(W1), -1, out=gx[i:i + R])
            else:
                gW1.addmm_(gh.view(len(xc), -1).T, xc)
                if ctx.needs_input_grad[1]:                    # (not for the vector CI's input)
                    torch.mm(gh.view(len(xc), -1), W1, out=gx[i:i + R])
        return None, gx, gW1, gb1, gW2, grad.sum(0)


class AttentionCI(nn.Module):
    """The paper's causal importance for sequences (Eq. 4, Algorithm 1):

        g_{c,n} = σ_H(γ_c(x̄_n)),  x̄_n = softmax((q_n Kᵀ + r_n) / √d) V  ⊕  x_pos,n

    one head, one layer, Q/K/V only (no bias, no output projection); q = Q x and k = K x carry no
    absolute position, the learned relative bias r[i - j] is added to the scores, and the learned
    absolute encoding to the values and the concatenated input (x_pos = x + AbsPosEnc). Algorithm 1
    lists RelPosEnc as (2s × d), Eq. 4 and the text call r_n "the row of learned relative positional
    biases": we use one scalar bias per offset, 2·max_seq_len - 1 numbers. Causal masking: the paper
    is silent (its RelPosEnc has offsets both ways); default causal=True (position n sees positions
    <= n, like the model it explains); the README measures causal=False."""

    def __init__(self, d, C, H, max_seq_len, causal=True):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.rel = nn.Parameter(torch.zeros(2 * max_seq_len - 1))   # bias for offset i - j
        self.abs = nn.Parameter(torch.randn(max_seq_len, d) * 0.02)
        self.gamma = GammaMLPs(C, H, 2 * d)
        self.max_seq_len, self.causal = max_seq_len, causal
        self.flex = None                                        # None: by device and size (below)

    def forward(self, x, V=None):                              # x (B, S, d)
        S, M = x.shape[1], self.max_seq_len
        if S > M:
            raise SPDError(f"sequence length {S} exceeds the attention CI's max_seq_len {M}")
        x_pos = x + self.abs[:S]                                # 1) (B, S, d)
        q, k, v = self.q(x), self.k(x), self.v(x_pos)           # 2)
        r = self.rel[M - S: M + S - 1]                          # 3) (2S-1,), r[i - j + S - 1]
        a = ci_attention(q, k, v, r, self.causal, self.flex)    # 4) (B, S, d)
        return self.gamma(torch.cat([a, x_pos], -1))            # 5, 6) (B, S, C)


def ci_attention(q, k, v, r, causal=True, flex=None):
    """softmax((q kᵀ + r) / √d) v with r[i - j + S - 1] the bias of query i, key j. flex=None picks
    flex-attention (compiled) on CUDA for head sizes d 16, 32, 64, 128, plain math elsewhere (torch
    2.13's flex has no CPU backward and no CUDA kernel for d < 16; in fp32 larger or padded sizes may
    not fit a GPU's shared memory; only d 16 has run, on an H100)."""
    S, d = q.shape[-2], q.shape[-1]
    if (q.is_cuda and d in (16, 32, 64, 128) if flex is None else flex):
        return _flex_attention(q, k, v, r, causal)
    i = torch.arange(S, device=q.device)
    bias = r[i[:, None] - i[None, :] + S - 1]                                  # (S, S)
    if causal:
        bias = bias.masked_fill(i[:, None] < i[None, :], float("-inf"))
    return ((q @ k.transpose(-1, -2) + bias) / math.sqrt(d)).softmax(-1) @ v   # (B, S, d)


_FLEX = {}


def _flex_attention(q, k, v, r, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    S, d = q.shape[-2], q.shape[-1]
    fn = q.device.type  # compile once per device type; eager flex on CPU (inference only) is for tests
    if fn not in _FLEX:
        _FLEX[fn] = torch.compile(flex_attention) if q.is_cuda else flex_attention
    key = (S, q.device)
    if causal and key not in _FLEX:
        _FLEX[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=q.device)

    def score_mod(score, b, h, qi, ki):  # flex has already scaled q·k by 1/√d
        return score + r[qi - ki + S - 1] / math.sqrt(d)

    out = _FLEX[fn](q[:, None], k[:, None], v[:, None], score_mod=score_mod,
                      block_mask=_FLEX[key] if causal else None)  # (B, 1, S, d)
    return out[:, 0]


def make_ci(kind, d_in, C, d_gate, max_seq_len=None, causal=True):
    if kind in ("scalar", "vector"):
        return GammaMLPs(C, d_gate, None if kind == "scalar" else d_in)
    if kind == "attention":
        if not max_seq_len:
            raise SPDError("the attention CI needs max_seq_len (the longest sequence it will see)")
        return AttentionCI(d_in, C, d_gate, max_seq_len, causal)
    raise SPDError(f"unknown CI function {kind!r}: use scalar, vector or attention")


# -----------------------------------------------------------------------------
# 4. Leaky hard sigmoids and stochastic masks (Sec. 4; Bushnaq et al. 2025)

class _LowerLeakyHardSigmoid(torch.autograd.Function):
    """Value clip(x, 0, 1); gradient as if the function were 0.01·x below 0 (as in SPD's code),
    so a subcomponent whose γ fell below 0 still gets gradient and can come back."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (0.01 + 0.99 * _above(x, 0) - _above(x, 1))   # 0.01 | 1 | 0


def _above(x, t):
    """1.0 where x > t, else 0.0 (~10x faster on a CPU than torch.where or a boolean mask)."""
    return torch.gt(x, t, out=torch.empty_like(x))


def leaky_hard_sigmoid(x, upper=False):
    """σ_H. Lower-leaky (default; for masks and reconstruction): clip(x, 0, 1), leaking gradient
    with slope 0.01 below 0. Upper-leaky (upper=True; for minimality): clip(x, 0, 1) below 1
    and 1 + 0.01 (x - 1) above, so minimality keeps pushing γ down from above 1."""
    if upper:
        return torch.where(x > 1, 1 + 0.01 * (x - 1), x.clamp(0, 1))
    return _LowerLeakyHardSigmoid.apply(x)


def sample_masks(g):
    """alpha = g + (1 - g) u, u ~ U(0, 1) independently per batch item, position and
    subcomponent: alpha ~ U(g, 1) (Sec. 4). Gradients reach g."""
    return g + (1 - g) * torch.rand_like(g)


# -----------------------------------------------------------------------------
# 5. Losses

def kl_divergence(logits, target_logits, weight=None, keep=0):
    """D_KL(target || pred) = Σ_v p_target (log p_target - log p_pred), as SPD's code (Eq. 2, 3, 5
    and 6 list the arguments the other way; README), summed over the vocabulary, then averaged (or
    `weight`ed) over the rest but the first `keep` dimensions (K mask sets: target_logits broadcasts
    over them)."""
    kl = F.kl_div(logits.log_softmax(-1), target_logits.log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)
    return _average(kl, weight, keep)


def faithfulness_loss(spd):
    """Eq. 1: (1/N) Σ_l Σ_ij (W^l_ij - Σ_c U^l_ic V^l_cj)², N the number of entries of all W^l."""
    sq = sum(((l.W - l.U @ l.V) ** 2).sum() for l in spd.layers.values())
    return sq / sum(l.W.numel() for l in spd.layers.values())


def importance_minimality_loss(g_upper, p, weight=None):
    """Eq. 1: Σ_l Σ_c |g^l_c(x)|^p, averaged over batch and positions (or weighted), on the
    upper-leaky causal importances (g >= 0). Computed as (g + 1e-12)^p where g > 0 and exactly
    0 where g = 0, so the gradient of g^p (p < 1) stays finite and zeros add nothing."""
    total = sum(torch.where(g > 0, (g + 1e-12) ** p, 0.0).sum(-1) for g in g_upper.values())  # (B, S)
    return _average(total, weight)


def _average(total, weight, keep=0):
    """The mean of total over its dimensions but the first `keep`, or its mean weighted by `weight`
    (broadcast to those dimensions)."""
    dims = list(range(keep, total.dim()))
    if weight is None:
        return total.mean(dims)
    return (total * weight).sum(dims) / weight.expand(total.shape[keep:]).sum()


def importance_minimality_loss_fused(pre, p, weight=None):
    """importance_minimality_loss({l: leaky_hard_sigmoid(pre[l], upper=True)}, p, weight) with
    the sigmoid and the power fused: equal (tested), ~5x faster on a CPU; training_step's."""
    return _average(sum(_MinimalityTerm.apply(v, p).sum(-1) for v in pre.values()), weight)


class _MinimalityTerm(torch.autograd.Function):
    """(σ_H^upper(x) + 1e-12)^p where x > 0, else 0, elementwise; its gradient
    p (g + 1e-12)^(p-1) · σ_H^upper'(x) (slope 1 on (0, 1], 0.01 above) is formed in forward."""

    @staticmethod
    def forward(ctx, x, p):
        g = x.clamp(0, 1).add_((x - 1).clamp_(min=0), alpha=0.01).add_(1e-12)   # σ_H^upper + ε
        on = _above(x, 0)
        term = g.pow(p).mul_(on)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(term.div(g).mul_(on.sub_(_above(x, 1), alpha=0.99)).mul_(p))
        return term

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


def random_layer_subset(names):
    """A uniformly random non-empty subset M of the layers (Eq. 5-6)."""
    if not names:
        raise SPDError("the partial losses need at least one layer to draw a subset from")
    while True:
        keep = torch.rand(len(names)) < 0.5
        if keep.any():
            return [n for n, k in zip(names, keep) if k]


# Every reconstruction loss is the mean of KL(f(x | W) || f(x | masked weights)) over a list of
# mask sets; a mask set names the layers it replaces, the others stay the target. Each entry
# builds its list from g, {layer: (B, S, C)} causal importances, and R, S samples of
# {layer: alpha (B, S, C)}; `reconstruction_losses` runs all of them in one forward.
RECONSTRUCTIONS = {
    # L_recon (Sec. 4): every layer masked by its causal importance, masks = g
    "recon": lambda g, R: [g],
    # Eq. 2: every layer masked by the s-th sample r^(s), s = 1..S
    "stochastic_recon": lambda g, R: list(R),
    # Eq. 3 with masks = g: one layer at a time replaced, the others the target (L sets)
    "layerwise_recon": lambda g, R: [{n: g[n]} for n in g],
    # Eq. 3: layer l masked by r^(l,s), the others the target (L·S sets)
    "stochastic_layerwise_recon": lambda g, R: [{n: r[n]} for r in R for n in r],
    # Eq. 5: the layers of one random non-empty subset M masked by g
    "partial_recon": lambda g, R: [{n: g[n] for n in random_layer_subset(list(g))}],
    # Eq. 6: per sample s a fresh subset M^(s) masked by r^(s)
    "stochastic_partial_recon": lambda g, R: [{n: r[n] for n in random_layer_subset(list(r))}
                                              for r in R],
}


def reconstruction_losses(spd, x, target_logits, g, R, names, weight=None, last_token_only=False):
    """The named reconstruction losses {name: value}, all from one batched forward.

    Each is the mean over its mask sets of kl_divergence(f(x | masks), f(x | W)), on the last
    column only if last_token_only (so no right padding), else weighted by `weight` (B, S)."""
    sets = {n: RECONSTRUCTIONS[n](g, R) for n in names}
    flat = [m for n in names for m in sets[n]]
    if not flat:
        return {}
    logits = spd.run_mask_sets(x, flat, last_token_only)         # (K, B, S, V) or (K, B, V)
    if last_token_only:
        target_logits, weight = target_logits[:, -1], None
    kl = kl_divergence(logits, target_logits, weight, keep=1)     # (K,), one per mask set
    return {n: v.mean() for n, v in zip(names, kl.split([len(sets[n]) for n in names]))}


# -----------------------------------------------------------------------------
# 6. Training step (Algorithm 3) and loop

@dataclasses.dataclass
class Config:
    """SPD hyperparameters; defaults are the paper's induction-head values (Table 4)."""
    C: int = 100                              # subcomponents per decomposed matrix
    ci: str = "attention"                     # causal-importance function: scalar|vector|attention
    d_gate: int = 16                          # hidden width D_gate of each γ_c MLP
    ci_causal: bool = True                    # attention CI: causal mask (the paper is silent)
    beta_faithfulness: float = 1000.0         # β of each loss (Table 4 / A.3.1)
    beta_minimality: float = 0.02
    minimality_decay_from: float = 1.0        # ours, not Table 4: from this fraction of the run
    beta_minimality_final: float = 0.0        # on (1: never), β_minimality falls linearly to this
    beta_recon: float = 0.5
    beta_stochastic_recon: float = 1.0
    beta_layerwise_recon: float = 0.0
    beta_stochastic_layerwise_recon: float = 1.0
    beta_partial_recon: float = 0.0
    beta_stochastic_partial_recon: float = 0.0
    n_mask_samples: int = 1                   # S in Eq. 2, 3, 6
    p_start: float = 0.9                      # minimality exponent p, annealed linearly ...
    p_final: float = 0.1                      # ... to this over the run
    last_token_only: bool = True              # reconstruction KL on the final position only
                                              # (the induction task's; a language model: False)
    steps: int = 100_000
    batch_size: int = 1024                    # (the scripts' next_batch reads it; train does not)
    optimizer: str = "adam"                   # adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0                 # AdamW only
    lr_schedule: str = "cosine"               # constant | cosine (quarter period, to 0)
    lr_warmup: float = 0.0                    # linear warm-up, as a fraction of steps
    faithfulness_warmup_steps: int = 0        # first fit U V to W on faithfulness alone ...
    faithfulness_warmup_lr: float = 0.01      # ... with Adam at this lr (SPD's code does this)
    seed: int = 0                             # train's draws (seed torch yourself for the init)
    log_every: int = 500                      # steps between log lines
    checkpoint_every: int = 1000              # steps between checkpoints (0: only on Ctrl-C)
    resume: bool = False                      # continue the run saved in the checkpoint
    device: str = "cpu"                       # (read by the scripts; train runs where the model is)
    compile: bool = False                     # torch.compile the step (README, "Step time")
    RUN_ONLY: ClassVar = {"resume", "log_every", "checkpoint_every", "device"}  # may change on resume


def minimality_p(cfg, step):
    """p annealed linearly from p_start to p_final over the run. With step a 0-dim tensor, p is
    one too, so a compiled training_step is compiled once, not once per value of p."""
    return cfg.p_start + (cfg.p_final - cfg.p_start) * step / max(cfg.steps - 1, 1)


def beta_minimality_at(cfg, step):
    """β_minimality, constant up to step t0 = minimality_decay_from · steps, then linear to
    beta_minimality_final at the last step (a tensor for a tensor step, like minimality_p)."""
    t0 = int(cfg.minimality_decay_from * cfg.steps)
    step = step.clamp(min=t0) if torch.is_tensor(step) else max(step, t0)
    return cfg.beta_minimality + (cfg.beta_minimality_final - cfg.beta_minimality) * (step - t0) \
        / max(cfg.steps - 1 - t0, 1)


def lr_at(cfg, step):
    """Linear warm-up, then constant or "cosine": lr·cos(π/2 · t/(T-1)), a quarter period down to 0
    at the last step, SPD's code when the paper was written (the half period came later)."""
    warm = int(cfg.lr_warmup * cfg.steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "cosine":
        return cfg.lr * math.cos(0.5 * math.pi * (step - warm) / max(cfg.steps - warm - 1, 1))
    return cfg.lr


def training_step(spd, x, cfg, step, weight=None):
    """One SPD step (Algorithm 3) on batch x; returns (total loss, {term: value}, g).

    weight (B, S), optional: which positions count (e.g. not padding). The comments number
    Algorithm 3's steps: step 1 (sampling x) is the caller's, step 10 (the update) train's."""
    # 2) Y <- M_θ(X): the target's logits, and each decomposed layer's input
    target_logits, inputs = spd.target_forward(x)
    # 3) C <- C_φ(X): causal importances, lower-leaky for masks, upper-leaky for minimality
    pre = spd.causal_importance(inputs)
    g = {n: leaky_hard_sigmoid(v) for n, v in pre.items()}
    # 4) R <- SampleMasks(C): S samples, shared by every stochastic loss
    R = [{n: sample_masks(v) for n, v in g.items()} for _ in range(cfg.n_mask_samples)]
    # 5) Ỹ <- M̃_φ(X; R): the decomposed model under every loss's masks, in one forward
    names = [n for n in RECONSTRUCTIONS if getattr(cfg, "beta_" + n) != 0]
    terms = reconstruction_losses(spd, x, target_logits, g, R, names, weight, cfg.last_token_only)
    terms["faithfulness"] = faithfulness_loss(spd)
    terms["minimality"] = importance_minimality_loss_fused(pre, minimality_p(cfg, step), weight)
    # 6-9) L = Σ_k β_k L_k
    beta = {n: getattr(cfg, "beta_" + n) for n in terms} | {"minimality": beta_minimality_at(cfg, step)}
    total = sum(beta[n] * v for n, v in terms.items())
    return total, terms, g


def make_optimizer(spd, cfg):
    """Adam or AdamW, fused: one kernel for all parameters (its step ~5x faster on a CPU)."""
    params = spd.trainable_parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, fused=True)
    raise SPDError(f"unknown optimizer {cfg.optimizer!r}: use adam or adamw")


def faithfulness_warmup(spd, cfg):
    """Fit U V to W on the faithfulness loss alone before the main run (SPD's code does this)."""
    opt = torch.optim.Adam([p for l in spd.layers.values() for p in (l.U, l.V)],
                           lr=cfg.faithfulness_warmup_lr)
    for _ in range(cfg.faithfulness_warmup_steps):
        opt.zero_grad(set_to_none=True)
        faithfulness_loss(spd).backward()
        opt.step()
    return faithfulness_loss(spd).item()


def train(spd, cfg, next_batch, log=print, checkpoint=None, data_rng=None):
    """Train U, V and the CI functions for cfg.steps steps (Algorithm 3 in a loop).

    next_batch() returns x, or (x, weight) with weight (B, S) marking the positions that count
    (cfg.batch_size and cfg.device are the caller's to use: train takes the batches as they come).
    cfg.seed seeds the masks' draws; seed torch before building the SPDModel for its initial U, V
    and CI. Every cfg.checkpoint_every steps and on Ctrl-C the run is saved to `checkpoint` (a
    path; a second run on it at once stops), with data_rng (the torch.Generator next_batch draws
    from; pass the same one to resume); cfg.resume continues it exactly. The file stays after the
    run as last saved: delete it once the result is saved (a new run on it stops). A non-finite
    loss stops the run with an SPDError. Returns the history: the loss terms and mean L0 per
    layer, one dict per log line."""
    from tqdm import tqdm
    if not isinstance(cfg, Config):
        raise SPDError(f"cfg must be a spd.Config (or a dataclass derived from it), got a "
                       f"{type(cfg).__name__}: e.g. spd.Config(**d)")
    check_config(dataclasses.replace(cfg, device="cpu"))       # (train reads no device)
    _plain(dataclasses.asdict(cfg))                            # (it must save: before, not after)
    built = dict(C=spd.spec["C"], ci=spd.spec["ci"], d_gate=spd.spec["d_gate"],
                 ci_causal=spd.spec["causal"])
    for k in [k for k, v in built.items() if getattr(cfg, k) != v][:1]:  # (else the saved config lies)
        raise SPDError(f"--{k}={getattr(cfg, k)} but the SPDModel was built with {built[k]}: build "
                       f"it with the config's C, ci, d_gate and causal=ci_causal, or set {k}={built[k]}")
    if (data_rng is not None and not isinstance(data_rng, torch.Generator)
            or checkpoint and os.path.isdir(checkpoint)):
        raise SPDError("checkpoint must be a file's path and data_rng a torch.Generator (or None)")
    torch.manual_seed(cfg.seed)
    opt, history, first, stop = make_optimizer(spd, cfg), [], 0, []
    step_fn = _compiled_step() if cfg.compile else training_step
    save_now = lambda step: checkpoint and save_checkpoint(checkpoint, spd, opt, cfg, step, history, data_rng)

    def diverged(what, fix="try a lower --lr or smaller betas"):
        kept = f"delete {checkpoint} (an earlier step's) and " if checkpoint and os.path.exists(
            checkpoint) else "nothing saved; "
        raise SPDError(f"{what}; stopped, {kept}{fix}")
    with _locked(checkpoint), _on_interrupt(lambda: stop.append(True)), _deterministic(cfg.compile):
        if cfg.resume:                 # (Ctrl-C from here on stops after the warm-up and a step)
            first, history = load_checkpoint(checkpoint, spd, opt, cfg, data_rng)
            log(f"resumed {checkpoint} at step {first}")
        elif checkpoint and os.path.exists(checkpoint):
            raise SPDError(f"{checkpoint} holds an unfinished run (or a finished run's last save): "
                           f"continue it with --resume=true, or delete it to start again")
        elif cfg.faithfulness_warmup_steps:
            fit = faithfulness_warmup(spd, cfg)
            if not math.isfinite(fit):
                diverged(f"the faithfulness warm-up ended at L_faithful {fit}",
                         "try a lower --faithfulness_warmup_lr")
            log(f"faithfulness warm-up: {cfg.faithfulness_warmup_steps} steps -> L_faithful {fit:.2e}")
        log("L0 below: the mean number of subcomponents with g > 0 per position, for " + ", ".join(spd.layers))
        t0 = time.time()
        for step in tqdm(range(first, cfg.steps), desc="SPD", mininterval=1.0, leave=False, disable=None):
            batch = next_batch()
            x, weight = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            _check_batch(x, weight, cfg.last_token_only)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            total, terms, g = step_fn(spd, x, cfg, step, weight)
            if not torch.isfinite(total):
                bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "total")
                diverged(f"step {step}: the loss term {bad} is {terms.get(bad, total).item()}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                row = {"step": step, "total": total.item(), **{k: v.item() for k, v in terms.items()},
                       "L0": {n: v.item() for n, v in mean_l0(g, weight).items()},
                       "it/s": (step + 1 - first) / (time.time() - t0)}
                history.append(row)
                l0 = " ".join(f"{v:.1f}" for v in row["L0"].values())
                log(f"step {step:6d} | " + " ".join(f"{k} {row[k]:.2e}" for k in ["total", *terms])
                    + f" | L0 {l0} | {row['it/s']:.4g} it/s")
            if stop:
                save_now(step + 1)
                raise SPDError(f"interrupted after step {step}" + (
                    f"; saved {checkpoint}: continue with --resume=true" if checkpoint else ""))
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_now(step + 1)
        fit = faithfulness_loss(spd).item()           # (the last update's result, which no loss saw)
        if not (math.isfinite(fit) and all(p.isfinite().all() for p in spd.trainable_parameters())):
            diverged(f"step {cfg.steps - 1}: after its update L_faithful is {fit} or a parameter is "
                     f"not finite")
    return history


# -----------------------------------------------------------------------------
# 7. Save / load

FORMAT = 2  # version of the files written below (format 1, before 227853f, is not read)


def _fingerprint(W, dtype=None):
    """Shape and SHA-256 of a target weight (as `dtype`): saved files name their target by these."""
    raw = W.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()     # (bf16 too)
    return [list(W.shape), hashlib.sha256(raw).hexdigest()]


def _same_target(model, path, ckpt):
    """Every layer the file decomposed is in `model` with the same weights, decomposed there or
    not (other layers of the same target: the spec's check names them)."""
    dtype = next(iter(ckpt["state"].values())).dtype             # (a float64 copy of it: the same)
    modules = dict(model.named_modules())
    for name, saved in ckpt["identity"].items():
        m = modules.get(name)
        m = m.target if isinstance(m, DecomposedLayer) else m
        if m is None:
            why = f"it decomposes {name!r}, which this model does not have"
        else:
            try:
                if _fingerprint(layer_weight(m), dtype) == saved:
                    continue
                why = f"layer {name!r} differs (shape or weights)"
            except SPDError:                                   # (layer_weight: no Linear/Conv1D)
                why = f"{name!r} is a module of type {type(m).__name__} here, not a Linear or Conv1D"
        raise SPDError(f"{path} was made for a different target: {why}; pass the target it was made for")


def _restore(spd, path, ckpt):
    dev = next(iter(spd.layers.values())).W.device
    trainable = [n for n, p in spd.named_parameters() if p.requires_grad]   # (the target is not saved)
    try:
        res = spd.load_state_dict({k: v.to(dev) for k, v in ckpt["state"].items()}, strict=False)
    except RuntimeError as e:                                  # a tensor of another shape (C)
        raise SPDError(f"{path} does not fit this decomposition "
                       f"({str(e).splitlines()[-1].strip()})") from None
    bad = res.unexpected_keys + [k for k in res.missing_keys if k in trainable]
    if bad:
        raise SPDError(f"{path} does not fit this code's decomposition: {bad[0]!r} is extra or missing")


def save(spd, path, config=None, **more):
    """One file: U, V, the CI parameters, the SPDModel spec, a config, the target's identity
    (and `more`: save_checkpoint's optimizer, step and random states)."""
    config = _plain(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config or {})
    state = {n: p.detach().cpu() for n, p in spd.named_parameters() if p.requires_grad}  # no target
    identity = {n: _fingerprint(l.W) for n, l in spd.layers.items()}
    obj = {"format": FORMAT, "spec": spd.spec, "config": config, "identity": identity,
           "state": state, **more}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _plain(config):
    """config through JSON, so weights_only loads it: numpy's numbers as numbers, a Path as str,
    anything else JSON cannot hold an SPDError (not its str: the loaded config would lie)."""
    def plain(v):
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, numbers.Real):
            return int(v) if isinstance(v, numbers.Integral) else float(v)
        raise SPDError(f"the config holds {repr(v)[:40]}, a {type(v).__name__}, which a saved file "
                       f"cannot hold: use numbers, strings, lists and dicts")
    return json.loads(json.dumps(config, default=plain))


def load(path, target):
    """(SPDModel on `target`, saved config) from a file written by `save`."""
    ckpt = read_file(path, "decomposition", "train one first (or delete the file and retrain)",
                     keys=("spec", "identity", "state"))
    _same_target(target, path, ckpt)
    spd = SPDModel(target, **ckpt["spec"])
    _restore(spd, path, ckpt)
    return spd, ckpt["config"]


def save_checkpoint(path, spd, opt, cfg, step, history, data_rng=None):
    """Everything a run needs to continue exactly after `step` steps."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    save(spd, path, cfg, step=step, history=history, optimizer=opt.state_dict(),
         rng=torch.get_rng_state(), cuda_rng=cuda_rng,
         data_rng=data_rng.get_state() if data_rng is not None else None)


def load_checkpoint(path, spd, opt, cfg, data_rng=None):
    """Restore a run saved by save_checkpoint; returns (next step, history)."""
    fix = "delete it to start again"
    if not path or not os.path.exists(path):
        raise SPDError(f"no checkpoint to resume at {path}; run without --resume=true")
    ckpt = read_file(path, "checkpoint", fix, keys=("step", "config", "optimizer", "state", "rng", "identity"))
    _same_target(spd.model, path, ckpt)                       # (first: another script's checkpoint)
    now = _plain(dataclasses.asdict(cfg))                     # (then: it names the flag)
    diff = [k for k in now if k not in cfg.RUN_ONLY and ckpt["config"].get(k) != now[k]]
    if diff:
        raise SPDError(f"{path} was saved with --{diff[0]}={ckpt['config'].get(diff[0])}, not "
                       f"{now[diff[0]]}: resume with the same config, or {fix}")
    built = [k for k in ckpt["spec"] if ckpt["spec"][k] != spd.spec.get(k)]   # (C, CI, layers, ...)
    if built:
        was, new = (f"[{_short(v, 3)}]" if isinstance(v, list) else v
                    for v in (ckpt["spec"].get(built[0]), spd.spec[built[0]]))
        raise SPDError(f"{path} was made by an SPDModel with {built[0]}={was}, not {new}: build it "
                       f"as then, or {fix}")
    if (data_rng is None) != (ckpt["data_rng"] is None):       # (else the batches differ, unseen)
        raise SPDError(f"{path} was saved {'without' if data_rng is not None else 'with'} a data_rng; "
                       f"resume as it ran (data_rng: the torch.Generator next_batch draws from, or "
                       f"None), or {fix}")
    _restore(spd, path, ckpt)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    for i, state in enumerate(ckpt["cuda_rng"][:torch.cuda.device_count()]):  # (saved with more GPUs: theirs)
        torch.cuda.set_rng_state(state, i)
    if data_rng is not None:
        data_rng.set_state(ckpt["data_rng"])
    return ckpt["step"], ckpt["history"]


# -----------------------------------------------------------------------------
# 8. Measures

@torch.no_grad()
def causal_importances(spd, x):
    """{layer: g (B, S, C)}, the lower-leaky causal importances of the target on x."""
    if not _tokens(x):
        raise SPDError(f"causal_importances needs tokens (B, S) as a tensor, B, S >= 1; got {_shape(x)}")
    _, inputs = spd.target_forward(x)
    return {n: leaky_hard_sigmoid(v) for n, v in spd.causal_importance(inputs).items()}


def mean_l0(g, weight=None, threshold=0.0):
    """{layer: mean number of subcomponents with g > threshold per position}."""
    return {n: _average((v > threshold).float().sum(-1), weight) for n, v in g.items()}


# -----------------------------------------------------------------------------
# 9. Plumbing: configs from the command line and their checks, a step's guards, files and locks

def apply_overrides(cfg, args):
    """Apply '--key=value' strings to a dataclass config; unknown keys and bad values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    parts = [a.removeprefix("--").partition("=") for a in args]      # (key, "=", value)
    keys = [key for key, _, _ in parts]
    for arg, (key, eq, value) in zip(args, parts):
        if not arg.startswith("--") or not eq:
            raise SPDError(f"bad argument {arg!r}: use --key=value")
        if key not in fields:
            raise SPDError(f"unknown config key {key!r}; known: {', '.join(fields)}")
        if keys.count(key) > 1:                       # (else the last would win unseen)
            raise SPDError(f"--{key} given {keys.count(key)} times; pass it once")
        value = os.path.expanduser(value)             # a leading ~ (no shell expands it after =)
        kind = _kind(cfg, key) or type(getattr(cfg, key))
        try:
            if kind is bool:
                value = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            elif kind is int and "e" in value.lower() and float(value).is_integer():
                value = float(value)                  # 1e4 is an int; 1.5e0 and 1e400 are not
            setattr(cfg, key, kind(value))
        except (KeyError, ValueError):
            need = "true or false" if kind is bool else f"{'an' if kind is int else 'a'} {kind.__name__}"
            raise SPDError(f"--{key} needs {need}, got {value!r}") from None
    return cfg


_at_least = lambda lo: (lambda v: lo <= v < 2**31, f">= {lo} and < 2**31")   # (sizes: allocatable)
_one_of = lambda *names: (lambda v: v in names, "one of " + ", ".join(names))
_POSITIVE = (lambda v: 0 < v < math.inf, "> 0 and finite")
_NONNEGATIVE = (lambda v: 0 <= v < math.inf, ">= 0 and finite")
_FILE = (lambda v: v != "" and not v.endswith(("/", os.sep)) and not os.path.isdir(v),
         "a file's path, not a folder")
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_THREADS = (lambda v: 0 <= v <= _CPUS, f"0 (one per core) to {_CPUS}, the cores this process may use")
CONFIG_RULES = {  # field -> (allowed?, what is allowed) for every non-bool field of Config
    "C": _at_least(1), "ci": _one_of("scalar", "vector", "attention"), "d_gate": _at_least(1),
    "n_mask_samples": _at_least(1),
    **{f.name: _NONNEGATIVE for f in dataclasses.fields(Config) if f.name.startswith("beta_")},
    "minimality_decay_from": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "p_start": (lambda v: 0 < v <= 2, "in (0, 2]"), "p_final": (lambda v: 0 < v <= 2, "in (0, 2]"),
    "steps": _at_least(1), "batch_size": _at_least(1), "optimizer": _one_of("adam", "adamw"),
    "lr": _POSITIVE, "weight_decay": _NONNEGATIVE, "lr_schedule": _one_of("constant", "cosine"),
    "lr_warmup": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "faithfulness_warmup_steps": _at_least(0), "faithfulness_warmup_lr": _POSITIVE,
    "seed": (lambda v: 0 <= v < 2**63, ">= 0 and < 2**63"), "log_every": _at_least(1),
    "checkpoint_every": _at_least(0), "device": (lambda v: v in ("cpu", "cuda", "auto") or
        v.startswith("cuda:") and v[5:].isascii() and v[5:].isdigit(), "cpu, cuda, cuda:N or auto"),
}
_KINDS = {bool: bool, int: numbers.Integral, float: numbers.Real, str: str}  # kind -> values it takes


def _kind(cfg, key):
    """bool, int, float or str: a field's annotation, else its default's type (None: not checked)."""
    f = cfg.__dataclass_fields__[key]
    return next((k for k in (f.type, type(f.default)) if k in _KINDS), None)


def check_config(cfg, rules=CONFIG_RULES):
    """One-line SPDError: a field not of its kind (numpy's numbers are; an int is a float, lr=1, but
    a bool is no int), or out of its range; no such CUDA device."""
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), _kind(cfg, f.name)
        if kind and not (isinstance(v, _KINDS[kind]) and isinstance(v, bool) == (kind is bool)):
            a = lambda t: ("an " if t.__name__[0] in "aeiou" else "a ") + t.__name__
            raise SPDError(f"--{f.name}={repr(v).splitlines()[0][:40]} is {a(type(v))}; it must be {a(kind)}")
    for name, (ok, allowed) in rules.items():
        if not ok(getattr(cfg, name)):
            raise SPDError(f"--{name}={getattr(cfg, name)} is out of range: it must be {allowed}")
    if cfg.device.startswith("cuda") and int(cfg.device[5:] or 0) >= torch.cuda.device_count():
        raise SPDError(f"--device={cfg.device} but there is no such CUDA device; use --device=cpu")
    return cfg


_tokens = lambda x: torch.is_tensor(x) and x.dim() >= 2 and 0 not in x.shape[:2]  # (B, S, ...), B, S >= 1
_shape = lambda t: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__     # for messages


def _check_batch(x, weight, last_token_only):
    """x (B, S, ...), B and S >= 1; weight (B, S), >= 0, not all 0, and > 0 at the final positions
    if only they are trained (every batch: one wait for a GPU, as the loss's check has anyway)."""
    if not _tokens(x):
        why = "it must give tokens, a tensor (B, S, ...) with B, S >= 1, or (tokens, weight)"
    elif weight is None:
        return
    elif not torch.is_tensor(weight) or weight.shape != x.shape[:2]:
        why = "weight must be a tensor (B, S), as the tokens' first two dimensions"
    elif not ((weight >= 0).all() and weight.sum() > 0):
        why = "weight must be >= 0 (no NaN) and not all 0"
    elif last_token_only and not weight[:, -1].all():
        why = "with last_token_only, weight must be > 0 at every final position (pad on the left)"
    else:
        return
    raise SPDError(f"next_batch() gave x {_shape(x)}, weight {_shape(weight)}: {why}")


def _compiled_step():
    """training_step through torch.compile, with step as a tensor (one graph for every step);
    inductor's failures (e.g. no C++ compiler) end in one line."""
    from torch._inductor.exc import InductorError
    compiled = torch.compile(training_step)

    def run(spd, x, cfg, step, weight=None):
        try:
            return compiled(spd, x, cfg, torch.tensor(step), weight)
        except InductorError as e:                             # "InvalidCxxCompiler: ..."
            raise SPDError(f"torch.compile failed ({str(e).splitlines()[0][:150]}); "
                           f"run with --compile=false") from e
    return run


@contextlib.contextmanager
def _deterministic(on):
    """Inside, deterministic algorithms (warn_only unless already strict) if on: else inductor's CPU
    kernels sum the CI's relative-bias gradient with atomic adds, and compiled runs differ (README)."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    if on and not was[0]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


_HELD = set()  # (checkpoint, thread) whose lock a script holds for its whole run: train's is then that


@contextlib.contextmanager
def _locked(checkpoint, flag="--out_dir", whole_run=False):
    """Inside, an exclusive flock on <checkpoint>.lock (the OS frees it however the process ends; the
    empty file stays, as removing it would let two runs lock two files of one name). whole_run: a
    script holds it around training and the files it writes after, and train, in the same thread,
    takes it as its own (in another thread, train stops: the lock is the thread's)."""
    key = checkpoint and (os.path.realpath(checkpoint), threading.get_ident())
    if not checkpoint or os.name == "nt" or key in _HELD:     # (Windows has no fcntl: no lock)
        yield
        return
    import fcntl
    make_dir(os.path.dirname(checkpoint), flag)
    try:
        f = open(f"{checkpoint}.lock", "a")
    except OSError as e:
        raise SPDError(f"cannot open the lock file {checkpoint}.lock ({e.strerror}): delete it, or "
                       f"pass another {flag}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SPDError(f"another run is using {checkpoint}: wait for it, or pass another "
                           f"{flag}") from None
        except OSError:                                        # a file system without locks: none
            pass
        if whole_run:
            _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)


@contextlib.contextmanager
def _on_interrupt(handler):
    """Inside, Ctrl-C (SIGINT) calls handler() instead of raising, so a step is never cut in
    half (in the main thread; other threads cannot handle signals and leave it alone)."""
    import signal
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *_: handler()) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def settings_text(cfg):
    """Every field of a config as --key=value, wrapped for --help: apply_overrides' input."""
    return textwrap.fill("  ".join(f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()), 100,
                         initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)


def resume_command(error, script, argv):
    """An error's text, with train's "continue with --resume=true" spelled out as the command to
    type: the run's settings (which a resume repeats), the script's path as typed if this process runs it."""
    typed = sys.argv[0] if os.path.basename(sys.argv[0]) == script else script
    command = ["python", typed, *(shlex.quote(a) for a in argv if not a.startswith("--resume=")),
               "--resume=true"]
    return str(error).replace("continue with --resume=true", "continue with: " + " ".join(command))


def keep_freed_memory():
    """glibc keeps freed memory (mmap threshold 32 MB, the most glibc < 2.35 takes; trim threshold
    1 GB), so new tensors are not page-faulted in afresh (README, "Step time"); process-wide. True if set."""
    try:
        libc = ctypes.CDLL("libc.so.6")           # mallopt: -3 M_MMAP_THRESHOLD, -1 M_TRIM_THRESHOLD
        return bool(libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):                          # not glibc: macOS, Windows, musl
        return False


def make_dir(path, what):
    """os.makedirs(path), or a one-line SPDError if it cannot be made or written into."""
    try:
        os.makedirs(path or ".", exist_ok=True)
    except OSError as e:
        raise SPDError(f"cannot make the folder {path or '.'!r} for {what} ({e.strerror})") from None
    if not os.access(path or ".", os.W_OK):
        raise SPDError(f"cannot write into the folder {path or '.'!r} for {what}")


def atomic_write(path, obj):
    """Write obj to a temporary file beside path (same extension), then os.replace it onto path: a
    run killed while writing leaves the previous file whole. obj: a function that writes a file of
    the name it is given (fig.savefig, lambda f: torch.save(x, f)), or what json.dumps takes."""
    if not isinstance(path, (str, os.PathLike)):
        raise SPDError(f"a path must be a str or os.PathLike, got {type(path).__name__}")
    make_dir(os.path.dirname(path), path)
    if os.path.isdir(path):
        raise SPDError(f"{path} is a folder: give a file name")
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"                     # (two processes: two names)
    try:
        if callable(obj):
            obj(tmp)
        else:
            with open(tmp, "w") as f:
                f.write(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except BaseException as e:                                 # (Ctrl-C, a bug: no temporary file left)
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):          # (torch.save's write errors: RuntimeError)
            raise
        kept = "; the earlier file there is kept" if os.path.exists(path) else ""
        raise SPDError(f"cannot write {path} ({type(e).__name__}: {(str(e) or '-').splitlines()[0][:100]})"
                       f"{kept}") from None


def read_file(path, what, fix, keys=()):
    """torch.load(path) (tensors only), or a one-line SPDError naming the file, the fault and
    the fix: missing, unreadable (truncated, garbage) or lacking `keys`."""
    if not isinstance(path, (str, os.PathLike)):
        raise SPDError(f"the {what}'s path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.exists(path):
        raise SPDError(f"{path}: no {what} there; {fix}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise SPDError(f"{path} is not a readable {what} ({type(e).__name__}); {fix}") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SPDError(f"{path} is no {what}: it has no {missing[0]!r}; {fix}")
    if isinstance(ckpt, dict) and ckpt.get("format", FORMAT) != FORMAT:
        raise SPDError(f"{path} has format {ckpt['format']}, this code reads {FORMAT}; {fix}")
    return ckpt

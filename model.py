"""The networks of Supervised Memory Training: teacher encoder and decoder, RNN cells, readout.

The registries CELLS, ENCODERS and READOUTS (at the end of their sections) are the one place a new part is named:
an entry there is a valid --cell, --encoder or --readout of train.py, and the tests cover it.
Shapes used throughout: a memory m is (N, K, d): K memory tokens of width d, each RMS-normalised, so the memory
holds Z = K * d numbers. Position t means "after reading x_0..x_t"; t = -1 is the empty memory m_empty.
This file imports nothing of the project's own.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


def rms(x):
    """Parameter-free RMS normalisation over the last dim: what makes a memory token 'normalised'."""
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A small Transformer of our own: RMSNorm, rotary positions, scaled_dot_product_attention, GELU MLP.

def rotary_freq(head_dim):
    """The rotary frequencies of one head: (head_dim / 2,) float32."""
    half = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))


def rotate(x, pos, inv_freq):
    """Rotary position embedding of x (..., L, head_dim) at integer positions pos (L,)."""
    half = x.size(-1) // 2
    angle = pos.to(torch.float32)[:, None] * inv_freq  # (L, half)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        assert d % n_heads == 0 and (d // n_heads) % 2 == 0, "d_model / n_heads must be an even integer"
        self.n_heads = n_heads
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        # a buffer, not recomputed per call (a few small kernels less per layer and step); not in the state_dict
        self.register_buffer("inv_freq", rotary_freq(d // n_heads), persistent=False)

    def forward(self, x, pos, ctx=None, ctx_pos=None, mask=None, causal=False):
        """x (N, Lq, d) attends to ctx (N, Lk, d) (itself when ctx is None). mask: bool, True = may attend, or a
        flex_attention BlockMask (see window_block_mask)."""
        ctx, ctx_pos = (x, pos) if ctx is None else (ctx, ctx_pos)
        N, Lq, d = x.shape
        h = self.n_heads
        q = self.q(x).view(N, Lq, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).view(N, ctx.size(1), 2, h, d // h).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, pos, self.inv_freq), rotate(k, ctx_pos, self.inv_freq)
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(N, Lq, d))


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm Transformer block; with cross=True it attends to a context instead of itself."""

    def __init__(self, d, n_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = Attention(d, n_heads)
        self.mlp = MLP(d, 4 * d, d)

    def forward(self, x, pos, ctx=None, ctx_pos=None, mask=None, causal=False):
        x = x + self.attn(self.norm1(x), pos, ctx, ctx_pos, mask, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, d, n_heads, depth):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(depth))
        self.norm = nn.RMSNorm(d)
        self.act_ckpt = False  # True: keep only each block's input for backward, recompute the rest (less memory)

    def forward(self, x, pos, mask=None, causal=False):
        for block in self.blocks:
            if self.act_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, pos, mask=mask, causal=causal, use_reentrant=False)
            else:
                x = block(x, pos, mask=mask, causal=causal)
        return self.norm(x)


def window_mask(q_pos, k_pos, context_len):
    """May a query at position q see the key at k: k <= q and within the last context_len tokens."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < context_len)


def window_block_mask(q_pos, num_keys, context_len):
    """window_mask(q_pos, arange(num_keys), context_len) as a flex_attention BlockMask: the fused kernels skip the
    blocks wholly outside the window instead of reading a dense (Lq, Lk) boolean mask."""
    def may_attend(b, h, q, k):
        diff = q_pos[q] - k
        return (diff >= 0) & (diff < context_len)
    return create_block_mask(may_attend, None, None, q_pos.numel(), num_keys, device=q_pos.device)


# ---------------------------------------------------------------------------------------------------------------
# Teacher encoders. Both map tokens x (B, L) and positions pos (P,) in [0, L) to memories (B, P, K, d), where the
# memory at t depends on x[..t] only. The window encoder reads x[t - context_len + 1 .. t]; in the causal one each
# attention layer looks context_len back, so its reach grows with depth (up to (depth + 1) * (context_len - 1)).

class WindowEncoder(nn.Module):
    """The paper's encoder: a bidirectional Transformer over one context window plus K memory registers.
    One encoder pass per memory: simple, but every memory re-reads its whole window."""

    def __init__(self, vocab_size, d, n_heads, depth, mem_tokens, context_len):
        super().__init__()
        self.context_len = context_len
        self.embed = nn.Embedding(vocab_size, d)
        self.registers = nn.Parameter(torch.randn(mem_tokens, d) * 0.02)
        self.body = Transformer(d, n_heads, depth)

    def forward(self, x, pos):
        B, P, K, Tc = x.size(0), pos.numel(), self.registers.size(0), self.context_len
        idx = pos[:, None] + torch.arange(1 - Tc, 1, device=x.device)  # (P, Tc), right-aligned windows
        valid = idx >= 0  # windows reaching before the sequence start are left-padded and masked out
        tokens = self.embed(x[:, idx.clamp(min=0)]).view(B * P, Tc, -1)
        regs = self.registers.expand(B * P, K, -1)
        seq = torch.cat([tokens, regs], dim=1)
        keys = torch.cat([valid, valid.new_ones(P, K)], dim=1)  # (P, Tc + K)
        mask = keys[None, :, None, None, :].expand(B, P, 1, 1, Tc + K).reshape(B * P, 1, 1, Tc + K)
        seq_pos = torch.cat([torch.arange(Tc, device=x.device), torch.full((K,), Tc, device=x.device)])
        out = self.body(seq, seq_pos, mask=mask)[:, Tc:]
        return rms(out).view(B, P, K, -1)


class CausalEncoder(nn.Module):
    """All memories from one pass: a causal (sliding-window) Transformer reads the sequence once; then K memory
    registers per requested position cross-attend to the token states they may see and to each other.
    Cost per memory is K register queries, not a re-read of the window."""

    def __init__(self, vocab_size, d, n_heads, depth, mem_tokens, context_len):
        super().__init__()
        self.context_len = context_len
        self.embed = nn.Embedding(vocab_size, d)
        self.body = Transformer(d, n_heads, depth)
        self.registers = nn.Parameter(torch.randn(mem_tokens, d) * 0.02)
        self.read = Block(d, n_heads)  # registers -> token states, masked per position
        self.mix = Block(d, n_heads)  # the K registers of one position attend to each other
        # the sliding windows as flex_attention BlockMasks (True) or SDPA's dense boolean masks (False); None: flex
        # where torch.compile fuses it into one kernel, dense when eager (eager flex materialises all the scores) and
        # for heads narrower than 16, which the fused kernel does not take (torch 2.11)
        self.flex = None
        self.flex_fits = d // n_heads >= 16

    def forward(self, x, pos):
        B, L = x.shape
        P, K = pos.numel(), self.registers.size(0)
        t = torch.arange(L, device=x.device)
        flex = torch.compiler.is_compiling() and self.flex_fits if self.flex is None else self.flex

        def mask(q_pos):  # the sliding window of queries at q_pos over the token states at t
            return window_block_mask(q_pos, L, self.context_len) if flex else window_mask(q_pos, t, self.context_len)
        if L <= self.context_len:
            h = self.body(self.embed(x), t, causal=True)
        else:
            h = self.body(self.embed(x), t, mask=mask(t))
        q_pos = pos.repeat_interleave(K)  # (P * K,)
        regs = self.registers.repeat(P, 1).expand(B, P * K, -1)
        r = self.read(regs, q_pos, ctx=h, ctx_pos=t, mask=mask(q_pos))
        r = self.mix(r.reshape(B * P, K, -1), pos.new_zeros(K))
        return rms(r).view(B, P, K, -1)


ENCODERS = dict(causal=CausalEncoder, window=WindowEncoder)  # (vocab_size, d, n_heads, depth, mem_tokens, context_len)


# ---------------------------------------------------------------------------------------------------------------

class Decoder(nn.Module):
    """Causal Transformer over [m_t ; x_{t+1} .. x_{t+F}]: predicts y_t .. y_{t+F}. Its first prediction, read off
    the last memory token, uses the memory alone: it is the RNN's readout g(m)."""

    def __init__(self, vocab_size, d, n_heads, depth):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.body = Transformer(d, n_heads, depth)
        self.head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, m, future=None):
        """m (N, K, d), future (N, F) tokens -> logits (N, F + 1, vocab)."""
        K = m.size(1)
        seq = m if future is None else torch.cat([m, self.embed(future)], dim=1)
        out = self.body(seq, torch.arange(seq.size(1), device=m.device), causal=True)
        return self.head(out[:, K - 1:])

    def at_offsets(self, m, offsets):
        """Predictions of y_{t+r} from m_t alone, for each offset r in offsets (R,; r < 0: a byte already read):
        m (N, K, d) -> logits (N, R, vocab). Each query is a copy of the last memory token placed where y_{t+r}
        would be read off in forward (position K - 1 + r), so rotary positions tell the decoder the distance; the
        queries carry nothing of the future, so they may see one another."""
        N, K, _ = m.shape
        seq = torch.cat([m, m[:, -1:].expand(-1, offsets.numel(), -1)], dim=1)
        pos = torch.cat([torch.arange(K, device=m.device), K - 1 + offsets.to(m.device)])
        return self.head(self.body(seq, pos, causal=True)[:, K:])


class LinearReadout(nn.Module):
    """Alternative readout: a linear map of the whole flattened memory to logits."""

    def __init__(self, vocab_size, d, mem_tokens):
        super().__init__()
        self.head = nn.Linear(mem_tokens * d, vocab_size)

    def forward(self, m):
        return self.head(m.flatten(1))


READOUTS = dict(decoder=None, linear=LinearReadout)  # (vocab_size, d, mem_tokens) -> g(m); None: the decoder's
#                                                      first prediction, read off the memory alone (the paper's)


# ---------------------------------------------------------------------------------------------------------------
# RNN cells: f(m, e) -> m' with m (N, K, d) and e (N, d) the embedded input; the output is RMS-normalised per
# memory token like the teacher's memories, so the dynamics targets are reachable.

class TransformerCell(nn.Module):
    """The paper's main backbone: a Transformer over [K memory tokens ; input embedding]; first K outputs."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        self.body = Transformer(d, n_heads, depth)

    def forward(self, m, e):
        K = m.size(1)
        out = self.body(torch.cat([m, e[:, None]], dim=1), torch.arange(K + 1, device=m.device))
        return rms(out[:, :K])


class MLPCell(nn.Module):
    """Residual MLP over the flattened memory and the input embedding."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        Z = mem_tokens * d
        self.norms = nn.ModuleList(nn.RMSNorm(Z + d) for _ in range(depth))
        self.mlps = nn.ModuleList(MLP(Z + d, 4 * d, Z) for _ in range(depth))

    def forward(self, m, e):
        z = m.flatten(1)
        for norm, mlp in zip(self.norms, self.mlps):
            z = z + mlp(norm(torch.cat([z, e], dim=1)))
        return rms(z.view_as(m))


class GRUCell(nn.Module):
    """torch's GRU cell with the flattened memory as its hidden state (depth and heads are unused)."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        self.cell = nn.GRUCell(d, mem_tokens * d)

    def forward(self, m, e):
        return rms(self.cell(e, m.flatten(1)).view_as(m))


class LSTMCell(nn.Module):
    """torch's LSTM cell; the first half of the memory tokens hold h, the second half c (mem_tokens must be even)."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        assert mem_tokens % 2 == 0, "the lstm cell needs an even mem_tokens (half h, half c)"
        self.cell = nn.LSTMCell(d, mem_tokens // 2 * d)

    def forward(self, m, e):
        h, c = m.flatten(1).chunk(2, dim=1)
        h, c = self.cell(e, (h, c))
        return rms(torch.cat([h, c], dim=1).view_as(m))


class ElmanCell(nn.Module):
    """The plain tanh RNN: m' = tanh(W m + U e + b)."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        self.w = nn.Linear(mem_tokens * d, mem_tokens * d)
        self.u = nn.Linear(d, mem_tokens * d, bias=False)

    def forward(self, m, e):
        return rms(torch.tanh(self.w(m.flatten(1)) + self.u(e)).view_as(m))


class TorchGRU(nn.Module):
    """torch.nn.GRU as a user would train it by BPTT: one layer, hidden state the flattened memory, no normalisation
    (so SMT's normalised targets are out of its reach: a baseline, not a student). run() reads a whole sequence in
    one fused call (cuDNN on a GPU); the step is the same call on one input."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        self.rnn = nn.GRU(d, mem_tokens * d, batch_first=True)

    def forward(self, m, e):
        return self.run(m, e[:, None])[:, 0]

    def run(self, m, e):
        """From memory m (N, K, d) over embedded inputs e (N, T, d): each step's memory, (N, T, K, d)."""
        out, _ = self.rnn(e, m.flatten(1)[None].contiguous())
        return out.view(*e.shape[:2], *m.shape[1:])


class TorchLSTM(nn.Module):
    """torch.nn.LSTM as a user would train it by BPTT: one layer, h in the first half of the memory tokens and c in
    the second, no normalisation. The fused call returns every step's h but not its c, so run() gives each memory's
    readable half (h); the readout reads h alone (out_tokens), as an LSTM's does."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        assert mem_tokens % 2 == 0, "the nn_lstm cell needs an even mem_tokens (half h, half c)"
        self.out_tokens = mem_tokens // 2
        self.rnn = nn.LSTM(d, mem_tokens // 2 * d, batch_first=True)

    def forward(self, m, e):
        h, c = m.flatten(1).chunk(2, dim=1)
        _, (h, c) = self.rnn(e[:, None], (h[None].contiguous(), c[None].contiguous()))
        return torch.cat([h[0], c[0]], dim=1).view_as(m)

    def run(self, m, e):
        """From memory m (N, K, d) over embedded inputs e (N, T, d): each step's h, (N, T, K / 2, d)."""
        h, c = m.flatten(1).chunk(2, dim=1)
        out, _ = self.rnn(e, (h[None].contiguous(), c[None].contiguous()))
        return out.view(*e.shape[:2], self.out_tokens, m.size(2))


CELLS = dict(transformer=TransformerCell, mlp=MLPCell, gru=GRUCell, lstm=LSTMCell, elman=ElmanCell, nn_gru=TorchGRU,
             nn_lstm=TorchLSTM)  # (d, n_heads, depth, mem_tokens) -> a module f(m, e) -> m', which SMT needs to
#   return RMS-normalised memory tokens; optional: run(m, e) for a whole sequence at once (BPTT, evaluation), and
#   out_tokens, how many leading memory tokens the readout reads (all if not set)


# ---------------------------------------------------------------------------------------------------------------

class SMTModel(nn.Module):
    """Teacher (encoder + decoder), RNN (embedding + cell), m_empty and the readout.

    with_encoder=False builds only what the RNN needs for inference (and all that BPTT trains): the embedding, the
    cell, m_empty and the readout: the decoder's next-token head unless READOUTS gives a module of its own.
    """

    def __init__(self, vocab_size, d_model, n_heads, mem_tokens, encoder_depth, decoder_depth, rnn_depth,
                 context_len, cell="transformer", encoder="causal", readout="decoder", with_encoder=True):
        super().__init__()
        self.mem_tokens, self.d_model = mem_tokens, d_model
        if with_encoder:
            self.encoder = ENCODERS[encoder](vocab_size, d_model, n_heads, encoder_depth, mem_tokens, context_len)
        else:
            self.encoder = None
        self.decoder = Decoder(vocab_size, d_model, n_heads, decoder_depth)
        self.rnn_embed = nn.Embedding(vocab_size, d_model)
        self.cell = CELLS[cell](d_model, n_heads, rnn_depth, mem_tokens)
        self.out_tokens = getattr(self.cell, "out_tokens", mem_tokens)  # what of a memory the readout reads
        head = READOUTS[readout]
        self.readout_head = head(vocab_size, d_model, self.out_tokens) if head is not None else None
        self.m_empty = nn.Parameter(rms(torch.randn(mem_tokens, d_model)))
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def set_act_ckpt(self, mode):
        """Activation checkpointing of the Transformers: none | cell (the RNN cell's, run on every transition in
        SMT: most of a step's activations) | all (also the encoder's and decoder's). Trades compute for memory."""
        chosen = {id(m) for part in {"none": [], "cell": [self.cell], "all": [self]}[mode] for m in part.modules()}
        for module in self.modules():
            if isinstance(module, Transformer):
                module.act_ckpt = id(module) in chosen

    def compile_parts(self, **options):
        """torch.compile the encoder (if any), the decoder and the cell in place, each on its own: the losses call
        the parts, not a forward of the whole model."""
        for part in (self.encoder, self.decoder, self.cell):
            if part is not None:
                part.compile(**options)

    def empty(self, batch):
        """m_empty for a batch: (batch, K, d)."""
        return rms(self.m_empty).expand(batch, -1, -1)

    def memories(self, x, pos):
        """Teacher memories (B, P, K, d) at positions pos (P,) in [-1, L): position -1 is m_empty."""
        m = self.encoder(x, pos.clamp(min=0))
        return torch.where((pos < 0)[None, :, None, None], self.empty(1)[:, None], m)

    def step(self, m, tokens):
        """One RNN step for a batch: m (N, K, d), tokens (N,) -> m' (N, K, d)."""
        return self.cell(m, self.rnn_embed(tokens))

    def readout(self, m):
        """g(m): next-token logits (N, vocab) from the memory alone (its first out_tokens tokens)."""
        m = m[:, : self.out_tokens]
        if self.readout_head is not None:
            return self.readout_head(m)
        return self.decoder(m)[:, 0]

    def rnn_state_dict(self):
        """What inference needs: no encoder weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

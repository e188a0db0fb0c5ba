"""The MoCo module: Momentum Contrast for unsupervised visual representation learning.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv:1911.05722 (MoCo v1);
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297 (MoCo v2).

One training step, as in the paper's Algorithm 1::

    f_k.params = m * f_k.params + (1 - m) * f_q.params      # momentum update (before computing keys)
    q = normalize(f_q(x_q))                                   # NxC
    k = normalize(f_k(x_k)).detach()                          # NxC, shuffled BN, no gradient
    l_pos = (q * k).sum(1)                                    # Nx1
    l_neg = q @ queue                                         # NxK
    loss = CrossEntropy(cat([l_pos, l_neg]) / T, zeros(N))   # positives at index 0
    loss.backward(); optimizer.step()
    enqueue(k); dequeue()                                     # FIFO queue of K keys (update_dictionary)

The two other mechanisms of the paper's Figure 3 differ only in where the negatives come from:

* ``end2end``: keys are encoded by the query encoder *with* gradient; the dictionary is the current batch
  (gathered over all ranks), so K = global batch - 1.
* ``memory_bank`` (Wu et al. 2018): one stored feature per training sample; K negatives sampled at random from the
  bank (no gradient); the positive key is the query encoder's feature of the other view (no gradient); the bank
  entries of the batch are updated with momentum: v <- normalize(b * v + (1 - b) * k), b = 0.5.

The dictionary update happens in :meth:`MoCo.update_dictionary`, called *after* ``loss.backward()``, so the queue is
never cloned: ``l_neg = q @ queue`` saves the queue for the backward pass, and it is only modified afterwards.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_zoo.device import rank, world_size

from .heads import backbone_features, build_encoder
from .shuffle_bn import (SplitBatchNorm2d, all_gather_with_grad, batch_shuffle_ddp, batch_unshuffle_ddp,
                         concat_all_gather, split_block_order)


class MocoOutput(NamedTuple):
    """What one forward pass produces: logits (already divided by T), targets, and what the dictionary update needs."""

    logits: torch.Tensor  # Nx(1+K)  (end2end: Nx(W*N))
    labels: torch.Tensor  # N, int64
    keys: Optional[torch.Tensor] = None  # NxC normalised keys of this rank (no grad)
    index: Optional[torch.Tensor] = None  # N dataset indices (memory_bank)


def infonce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of InfoNCE (Eq. 1 of arXiv:1911.05722). q, k: NxC; negatives: CxK -> Nx(1+K), divided by T."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.mm(q, negatives.to(q.dtype))  # NxK
    return torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and dictionary (queue / batch / memory bank).

    Args:
        arch: timm ResNet name or ``tv:<torchvision name>``.
        dim: feature dimension C (128).
        K: queue size (moco) or number of sampled negatives (memory_bank); unused by end2end.
        m: key-encoder momentum (0.999); may be changed between steps (cosine schedule).
        T: softmax temperature (0.07 v1, 0.2 v2).
        mlp: v2 MLP head instead of the v1 linear head.
        mechanism: "moco" | "end2end" | "memory_bank".
        shuffle_bn: "ddp" | "split" | "off" (resolved; see :mod:`moco_zoo.pretrain.shuffle_bn`).
        shuffle_groups: G of the split emulation.
        bank_size: number of training samples (memory_bank).
        bank_momentum: momentum of the stored features (memory_bank, 0.5).
    """

    def __init__(self, arch: str = "resnet50", dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07,
                 mlp: bool = False, mechanism: str = "moco", shuffle_bn: str = "split", shuffle_groups: int = 8,
                 bank_size: int = 0, bank_momentum: float = 0.5) -> None:
        super().__init__()
        if mechanism not in ("moco", "end2end", "memory_bank"):
            raise ValueError(f"unknown mechanism {mechanism!r}: expected moco, end2end or memory_bank")
        if shuffle_bn not in ("ddp", "split", "off"):
            raise ValueError(f"unresolved shuffle_bn mode {shuffle_bn!r}: expected ddp, split or off")
        self.K, self.m, self.T, self.dim = int(K), float(m), float(T), int(dim)
        self.mechanism, self.shuffle_bn, self.bank_momentum = mechanism, shuffle_bn, float(bank_momentum)
        self.shuffle_groups = int(shuffle_groups)

        self.encoder_q, self.feat_dim = build_encoder(arch, dim, mlp)
        if shuffle_bn == "split":
            # Contiguous-block groups; _encode reorders every encoder input so that they are the groups {i % G}.
            SplitBatchNorm2d.convert(self.encoder_q, shuffle_groups)

        # Host mirror of queue_ptr (the buffer stays the checkpointed truth): the enqueue needs the position as a
        # python int, and reading the buffer would synchronise with the device at every step. The mirror is re-read
        # from the buffer whenever the buffer was written by anything else (load_state_dict, .to(), user code).
        self._ptr_cache: Optional[Tuple[int, Tuple[int, int]]] = None
        if mechanism == "moco":
            self.encoder_k = copy.deepcopy(self.encoder_q)  # initialised as a copy of the query encoder
            for p in self.encoder_k.parameters():
                p.requires_grad_(False)  # the key encoder is not updated by back-propagation
            self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))  # CxK
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        elif mechanism == "memory_bank":
            if bank_size <= 0:
                raise ValueError("memory_bank needs bank_size = number of training samples (> 0)")
            if self.K >= bank_size:
                raise ValueError(f"memory_bank: K={self.K} sampled negatives must be smaller than the number of "
                                 f"training samples ({bank_size}); lower --moco-k")
            self.register_buffer("memory_bank", F.normalize(torch.randn(bank_size, dim), dim=1))  # NdataxC

    # ------------------------------------------------------------------ no-grad building blocks
    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over parameters (one fused foreach lerp: theta_k + (1 - m)
        (theta_q - theta_k), the same value up to float rounding; m = 1 leaves theta_k unchanged); buffers are copied."""
        pk = [p for p in self.encoder_k.parameters()]
        pq = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(pk, pq, 1.0 - self.m)
        bk = [b for b in self.encoder_k.buffers()]
        if bk:
            torch._foreach_copy_(bk, [b for b in self.encoder_q.buffers()])

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """FIFO update. keys: NxC from this rank; keys of all ranks are gathered so every rank keeps the same queue.

        Any K and any batch size: positions wrap around the end of the queue (no ``K % N == 0`` assert), and a
        batch larger than K keeps its newest K keys.
        """
        keys = concat_all_gather(keys)  # (W*N)xC
        n = keys.shape[0]
        offset = max(0, n - self.K)  # a batch larger than K: only its newest K keys survive
        keys = keys[offset:].T.to(self.queue.dtype)  # CxN'
        ptr = self._queue_position()
        start = (ptr + offset) % self.K  # column of the first surviving key; the block may wrap around the end
        first = min(keys.shape[1], self.K - start)
        self.queue[:, start:start + first] = keys[:, :first]
        if first < keys.shape[1]:
            self.queue[:, :keys.shape[1] - first] = keys[:, first:]
        self._set_queue_position((ptr + n) % self.K)

    def _queue_position(self) -> int:
        """queue_ptr as a python int, from the host mirror unless the buffer was written by someone else."""
        buf = self.queue_ptr
        key = (buf.data_ptr(), buf._version)
        if self._ptr_cache is None or self._ptr_cache[1] != key:
            self._ptr_cache = (int(buf), key)  # one read (a device sync) after an outside write only
        return self._ptr_cache[0]

    def _set_queue_position(self, ptr: int) -> None:
        self.queue_ptr.fill_(ptr)  # a python scalar: no host-device sync
        self._ptr_cache = (ptr, (self.queue_ptr.data_ptr(), self.queue_ptr._version))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: D401 - nn.Module hook
        super()._load_from_state_dict(*args, **kwargs)
        if hasattr(self, "queue_ptr"):
            self._ptr_cache = None  # resume: re-read the restored queue_ptr at the next enqueue

    @torch.no_grad()
    def update_memory_bank(self, keys: torch.Tensor, index: torch.Tensor) -> None:
        """v_i <- normalize(b v_i + (1 - b) k_i) for the batch's samples (gathered over ranks)."""
        keys, index = concat_all_gather(keys), concat_all_gather(index)
        b = self.bank_momentum
        new = F.normalize(self.memory_bank[index] * b + keys.to(self.memory_bank.dtype) * (1.0 - b), dim=1)
        self.memory_bank.index_copy_(0, index, new)

    @torch.no_grad()
    def prefill_dictionary(self, im_k: torch.Tensor, index: Optional[torch.Tensor] = None) -> int:
        """Warm start, before the first step: store real keys of ``im_k`` (NxCxHxW) in place of the random initial
        dictionary; returns the number of keys stored (over all ranks).

        Why: while the queue still holds random unit vectors (mean ~0), the loss pulls every query towards its key
        and pushes it from nothing, so all queries move towards the keys' common direction. A randomly initialised
        ResNet already maps all images to nearly one direction (cosine ~0.9), and on small data these first K/N steps
        collapse the features to a point that the queue then keeps (every key equal; no gradient separates them).
        With real keys from the first step the common direction cancels between positive and negatives. ``moco``
        enqueues the key encoder's keys; ``memory_bank`` writes the query encoder's features at ``index``.
        """
        if self.mechanism == "moco":
            keys = self.encode_keys(im_k)  # NxC
            self.dequeue_and_enqueue(keys)
            return keys.shape[0] * world_size()
        if self.mechanism == "memory_bank":
            if index is None:
                raise ValueError("memory_bank prefill needs the dataset indices of the batch")
            keys = concat_all_gather(self.encode_keys(im_k, self.encoder_q))  # (W*N)xC
            idx = concat_all_gather(index.to(keys.device))
            self.memory_bank.index_copy_(0, idx, keys.to(self.memory_bank.dtype))
            return keys.shape[0]
        return 0  # end2end: the dictionary is the current batch

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor, encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """k = normalize(f_k(x_k)) with shuffled BN. im_k: NxCxHxW -> NxC (no gradient).

        ``encoder`` defaults to the key encoder; the memory bank encodes its positive keys with the query encoder.
        """
        encoder = self.encoder_k if encoder is None else encoder
        if self.shuffle_bn == "ddp":
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            return batch_unshuffle_ddp(F.normalize(encoder(im_k), dim=1), idx_unshuffle)
        if self.shuffle_bn == "split":  # random permutation, then BN groups {i % G} of the shuffled batch
            return F.normalize(self._encode(encoder, im_k, torch.randperm(im_k.shape[0], device=im_k.device)), dim=1)
        return F.normalize(encoder(im_k), dim=1)

    def _encode(self, encoder: nn.Module, x: torch.Tensor, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``encoder(x[perm])`` (``perm`` optional), with the rows of the output in ``x``'s order.

        Split shuffle-BN (training): sample ``i`` of the encoder's input ``x[perm]`` is in BN group ``i % G``. The
        encoder's SplitBatchNorm2d layers normalise contiguous blocks, so the input is gathered once in the order
        ``perm[split_block_order]`` (group j = block j) and the NxC output is put back with the inverse permutation;
        BN is the only layer that mixes samples, so this is the same computation as interleaved groups.
        """
        order = split_block_order(x.shape[0], self.shuffle_groups, x.device) \
            if self.shuffle_bn == "split" and encoder.training else None
        idx = perm if order is None else (order if perm is None else perm[order])
        if idx is None:
            return encoder(x)
        return encoder(x[idx])[torch.argsort(idx)]

    # ------------------------------------------------------------------ forward per mechanism
    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: Optional[torch.Tensor] = None) -> MocoOutput:
        """im_q, im_k: two views NxCxHxW; index: N dataset indices (memory_bank only)."""
        if self.mechanism == "end2end":
            return self._forward_end2end(im_q, im_k)
        if self.mechanism == "memory_bank":
            if index is None:
                raise ValueError("memory_bank needs the dataset indices of the batch (forward(im_q, im_k, index))")
            return self._forward_memory_bank(im_q, im_k, index)
        q = F.normalize(self._encode(self.encoder_q, im_q), dim=1)  # NxC
        with torch.no_grad():
            self.momentum_update_key_encoder()
            k = self.encode_keys(im_k)  # NxC
        logits = infonce_logits(q, k, self.queue, self.T)  # Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return MocoOutput(logits, labels, keys=k)

    def _forward_end2end(self, im_q: torch.Tensor, im_k: torch.Tensor) -> MocoOutput:
        n = im_q.shape[0]
        q = F.normalize(self._encode(self.encoder_q, im_q), dim=1)  # NxC
        if self.shuffle_bn == "split":  # shuffle so a key's BN group differs from its query's
            perm = torch.randperm(n, device=im_k.device)
            k = F.normalize(self._encode(self.encoder_q, im_k, perm), dim=1)  # NxC, with gradient
        else:
            k = F.normalize(self.encoder_q(im_k), dim=1)  # NxC, with gradient
        k_all = all_gather_with_grad(k)  # (W*N)xC, differentiable
        logits = torch.mm(q, k_all.T) / self.T  # Nx(W*N): the positive of row i is column rank*N + i
        labels = torch.arange(n, device=q.device) + rank() * n
        return MocoOutput(logits, labels)

    def _forward_memory_bank(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor) -> MocoOutput:
        q = F.normalize(self._encode(self.encoder_q, im_q), dim=1)  # NxC
        with torch.no_grad():
            k = self.encode_keys(im_k, self.encoder_q)  # NxC, positive key, no gradient, shuffled BN
            neg_idx = torch.randint(0, self.memory_bank.shape[0], (self.K,), device=q.device)
            negatives = self.memory_bank[neg_idx].T  # CxK (a copy: the bank may be updated before backward)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
        l_neg = torch.mm(q, negatives.to(q.dtype))  # NxK
        # A sampled "negative" that is the query's own sample is not a negative: mask it out.
        own = neg_idx.unsqueeze(0) == index.to(q.device).unsqueeze(1)  # NxK
        logits = torch.cat([l_pos, l_neg.masked_fill(own, float("-inf"))], dim=1) / self.T  # Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return MocoOutput(logits, labels, keys=k, index=index.to(q.device))

    @torch.no_grad()
    def update_dictionary(self, out: MocoOutput) -> None:
        """After ``loss.backward()``: enqueue the keys (moco) or update the memory bank (memory_bank)."""
        if self.mechanism == "moco":
            self.dequeue_and_enqueue(out.keys)
        elif self.mechanism == "memory_bank":
            self.update_memory_bank(out.keys, out.index)

    # ------------------------------------------------------------------ evaluation helpers
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of the query encoder (for the kNN monitor). x: NxCxHxW -> NxD."""
        return backbone_features(self.encoder_q, x)

"""Train a TopK SAE with a PyTorch peer library on activations from a .npy file (the peer venv runs this).

    /work/peers/venv/bin/python benchmarks/peer_train.py --trainer sparsify --data x.npy --out w.npz \
        --n-latents 384 --k 6 --batch 1024 --epochs 3 --lr 1e-3 --warmup 100 --schedule constant

Runs without saepipe or MLX (torch + the peer only). Each trainer follows its library's own training
loop, step by step, as read from the sources (EleutherAI sparsify ``sparsify/trainer.py``, SAELens
``sae_lens/training/sae_trainer.py``), except that the rows come from the .npy in a seeded
per-epoch permutation (like ``saepipe.fit_sae``; the last partial batch of an epoch is skipped):

- ``sparsify``: ``SparseCoder`` (encoder = ``nn.Linear`` init, decoder = its unit-normalized copy,
  ``b_enc`` = 0), ``b_dec`` = mean of the first batch, decoder rows renormalized before every
  forward, loss = FVU + ``auxk_alpha`` * AuxK (dead mask: not fired for more than
  ``dead_threshold`` tokens; sparsify's default alpha is 0), the decoder gradient's component along
  each row removed, ``torch.optim.Adam`` (no gradient clipping), transformers'
  ``get_linear_schedule_with_warmup`` (``--schedule linear``, sparsify's) or
  ``get_constant_schedule_with_warmup`` (``constant``) formulas, or saepipe's cosine to 0.1x after the
  warmup (``cosine``, for equal settings); lr default
  ``2e-4 / sqrt(n_latents / 2**14)``.
- ``sae_lens``: ``TopKTrainingSAE`` (decoder init norm 0.1, encoder = decoder^T,
  ``rescale_acts_by_decoder_norm``), loss = sum-of-squares per row, mean over rows + AuxK
  (``aux_loss_coefficient``; dead = no fire for ``dead_window`` steps), ``clip_grad_norm_(1.0)``,
  Adam, SAELens' ``get_lr_scheduler`` (``constant`` = its default, ``cosineannealing``); its
  default lr 3e-4. The saved weights have the decoder norms folded in (unit decoder rows).

Writes ``--out`` (.npz: W_enc (h, d), b_enc, W_dec (h, d), b_dec; the input is used as is: no
normalization) and prints one JSON line: seconds (training loop only), steps, tokens, lr, and the
last step's loss.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def _batches(x: np.ndarray, batch: int, epochs: int, seed: int):
    n = len(x)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, 7, epoch]).permutation(n)
        for b in range(n // batch):
            rows = np.sort(order[b * batch : (b + 1) * batch])
            yield np.asarray(x[rows], dtype=np.float32)


def train_sparsify(x, a, torch):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(a.seed)
    d = x.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=a.n_latents, k=a.k), device="cpu", dtype=torch.float32)
    lr = a.lr if a.lr is not None else 2e-4 / (sae.num_latents / 2**14) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    total = (len(x) // a.batch) * a.epochs
    warm = a.warmup

    def factor(step: int) -> float:  # transformers' schedules, as sparsify's trainer uses them
        if step < warm:
            return step / max(1, warm)
        if a.schedule == "constant":
            return 1.0
        if a.schedule == "cosine":  # not sparsify's: saepipe's cosine to 0.1x, for equal settings
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    loss = float("nan")
    t0 = time.perf_counter()
    for step, xb in enumerate(_batches(x, a.batch, a.epochs, a.seed)):
        xt = torch.from_numpy(xb)
        if step == 0:
            sae.b_dec.data = xt.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > a.dead_threshold if a.auxk_alpha > 0 else None
        out = sae(xt, dead_mask=dead)
        total_loss = out.fvu + a.auxk_alpha * out.auxk_loss
        total_loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired += len(xb)
            since_fired[out.latent_indices.flatten()] = 0
        loss = float(out.fvu)
    seconds = time.perf_counter() - t0
    sae.set_decoder_norm_to_unit_norm()  # what its next forward would use
    w = {"W_enc": sae.encoder.weight, "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    return {n: t.detach().numpy().astype(np.float32) for n, t in w.items()}, seconds, total, lr, loss


def train_sae_lens(x, a, torch):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.optim import get_lr_scheduler

    torch.manual_seed(a.seed)
    d = x.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=a.n_latents, k=a.k, dtype="float32", device="cpu",
                                                aux_loss_coefficient=a.aux_coef))
    lr = a.lr if a.lr is not None else 3e-4
    total = (len(x) // a.batch) * a.epochs
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    name = {"constant": "constant", "cosine": "cosineannealing"}[a.schedule]
    sched = get_lr_scheduler(name, optimizer=opt, training_steps=total, lr=lr, warm_up_steps=a.warmup,
                             decay_steps=0, lr_end=lr / 10, num_cycles=1)
    since_fired = torch.zeros(a.n_latents)
    loss = float("nan")
    extra = {"is_logging_step": False} if "is_logging_step" in TrainStepInput.__dataclass_fields__ else {}
    t0 = time.perf_counter()
    for step, xb in enumerate(_batches(x, a.batch, a.epochs, a.seed)):
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=torch.from_numpy(xb), coefficients={},
                                                       dead_neuron_mask=(since_fired > a.dead_window).bool(),
                                                       n_training_steps=step, **extra))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired += 1
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        loss = float(out.losses["mse_loss"])
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # fold the decoder norms in (what SAELens saves for inference)
        norm = sae.W_dec.norm(dim=-1)
        w = {"W_enc": (sae.W_enc * norm[None, :]).T, "b_enc": sae.b_enc * norm,
             "W_dec": sae.W_dec / norm[:, None], "b_dec": sae.b_dec}
    return {n: t.detach().contiguous().numpy().astype(np.float32) for n, t in w.items()}, seconds, total, lr, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=("sparsify", "sae_lens"), required=True)
    p.add_argument("--data", required=True, help=".npy of (n, d) training rows")
    p.add_argument("--out", required=True, help=".npz for the weights")
    p.add_argument("--n-latents", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: the library's)")
    p.add_argument("--warmup", type=int, default=None, help="default: sparsify 1000, SAELens 0")
    p.add_argument("--schedule", default=None, help="sparsify: linear|constant|cosine; sae_lens: constant|cosine")
    p.add_argument("--auxk-alpha", type=float, default=0.0, help="sparsify's auxk_alpha (its default 0)")
    p.add_argument("--dead-threshold", type=int, default=10_000_000, help="sparsify: tokens (its default)")
    p.add_argument("--aux-coef", type=float, default=1.0, help="SAELens aux_loss_coefficient (its default)")
    p.add_argument("--dead-window", type=int, default=1000, help="SAELens dead_feature_window (steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.warmup is None:
        a.warmup = 1000 if a.trainer == "sparsify" else 0
    if a.schedule is None:
        a.schedule = "linear" if a.trainer == "sparsify" else "constant"

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    x = np.load(a.data, mmap_mode="r")
    train = train_sparsify if a.trainer == "sparsify" else train_sae_lens
    weights, seconds, steps, lr, loss = train(x, a, torch)
    np.savez(a.out, **weights)
    print(json.dumps({"seconds": seconds, "steps": steps, "tokens": steps * a.batch, "lr": lr,
                      "last_loss": loss if math.isfinite(loss) else None}))


if __name__ == "__main__":
    main()

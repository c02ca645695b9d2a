"""Train an SAE on a Hugging Face dataset (wikitext), then validate it on held-out texts.

    uv run python examples/sae_realistic_training.py                  # wikitext, or the built-in corpus offline
    uv run python examples/sae_realistic_training.py --dataset builtin --num-texts 60 --layer 2 --context-length 32

Follows mlxterp's guide: filter short texts, truncate long ones, dedupe, train, watch loss / L0 /
dead fraction, then check reconstruction and dead features on texts the SAE never saw. Without
network access (or with --dataset builtin) the texts come from saepipe's built-in offline corpus;
a log line says so. Sizes shrink with flags or SAEPIPE_EXAMPLE_<FLAG> variables (see --help).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import numpy as np

from saepipe import InterpretableModel, SAEConfig
from saepipe.evaluation.metrics import reconstruction_metrics
from saepipe.lm.sites import Site

log = logging.getLogger("sae_realistic_training")


def env_default(name: str, default: object) -> object:
    """A flag's default, overridable by the environment variable SAEPIPE_EXAMPLE_<NAME>."""
    return type(default)(os.environ.get(f"SAEPIPE_EXAMPLE_{name.upper()}", default))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env_default("model", "default"))
    p.add_argument("--dataset", default=env_default("dataset", "wikitext"),
                   help='HF dataset name, or "builtin" for the offline corpus')
    p.add_argument("--dataset-config", default=env_default("dataset_config", "wikitext-103-raw-v1"))
    p.add_argument("--text-column", default=env_default("text_column", "text"))
    p.add_argument("--num-texts", type=int, default=env_default("num_texts", 3000))
    p.add_argument("--eval-texts", type=int, default=env_default("eval_texts", 50))
    p.add_argument("--layer", type=int, default=env_default("layer", 10))
    p.add_argument("--component", default=env_default("component", "mlp"), choices=["mlp", "attn", "output"])
    p.add_argument("--context-length", type=int, default=env_default("context_length", 64))
    p.add_argument("--expansion-factor", type=int, default=env_default("expansion_factor", 8))
    p.add_argument("--k", type=int, default=env_default("k", 32))
    p.add_argument("--epochs", type=int, default=env_default("epochs", 3))
    p.add_argument("--batch-size", type=int, default=env_default("batch_size", 1024))
    p.add_argument("--warmup-steps", type=int, default=env_default("warmup_steps", 50))
    p.add_argument("--out", type=Path, default=Path(env_default("out", "examples_out")))
    return p.parse_args()


def prepare_dataset(raw_texts, min_len: int = 50, max_len: int = 512, limit: int | None = None) -> list[str]:
    """mlxterp's recipe: drop short texts, truncate long ones, remove duplicates (keeps order)."""
    filtered: dict[str, None] = {}
    for text in raw_texts:
        text = text.strip()
        if len(text) < min_len:
            continue
        filtered.setdefault(text[:max_len])
        if limit is not None and len(filtered) >= limit:
            break
    return list(filtered)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick connection test, so that offline runs skip the hub client's long retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def builtin_texts() -> list[str]:
    from saepipe.texts.corpus import builtin_corpus

    corpus = builtin_corpus()
    order = np.random.default_rng(0).permutation(len(corpus))  # mix the four sources
    return [corpus[i].text for i in order]


def load_texts(args: argparse.Namespace) -> list[str]:
    """``args.num_texts + args.eval_texts`` prepared texts from the HF dataset, else the built-in corpus."""
    want = args.num_texts + args.eval_texts
    if args.dataset != "builtin":
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        if offline or hub_reachable():
            try:
                from datasets import load_dataset

                # streaming: read only the first texts instead of downloading all of wikitext-103
                dataset = load_dataset(args.dataset, args.dataset_config, split="train", streaming=not offline)
                texts = prepare_dataset((item[args.text_column] for item in dataset), limit=want)
                log.info("using %d texts of %s/%s", len(texts), args.dataset, args.dataset_config)
                return texts
            except Exception as err:  # offline cache miss, unknown dataset, network error
                log.warning("could not load %s/%s (%s: %s); falling back to the built-in offline corpus",
                            args.dataset, args.dataset_config, type(err).__name__, err)
        else:
            log.warning("the Hugging Face hub is not reachable; falling back to the built-in offline corpus")
    return prepare_dataset(builtin_texts(), limit=want)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    texts = load_texts(args)
    if len(texts) < 2:
        raise SystemExit(f"only {len(texts)} usable texts: need at least 2")
    n_eval = min(args.eval_texts, len(texts) // 2)
    train_texts, test_texts = texts[: len(texts) - n_eval], texts[len(texts) - n_eval :]
    print(f"{len(train_texts)} training texts, {len(test_texts)} held-out texts")

    model = InterpretableModel(args.model)
    config = SAEConfig(
        expansion_factor=args.expansion_factor,
        k=args.k,
        learning_rate=3e-4,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        validation_split=0.05,
        normalize_input=True,
        tied_weights=False,
        gradient_clip=1.0,
    )
    save_path = args.out / f"sae_{args.dataset}_layer{args.layer}_{args.component}.mlx"
    sae = model.train_sae(layer=args.layer, dataset=train_texts, save_path=save_path, config=config,
                          component=args.component, context_length=args.context_length)

    # Training monitoring: loss should fall, L0 should equal k, few dead latents.
    for entry in model.last_fit.history:
        print(f"epoch {entry['epoch']}: train loss {entry['train/loss']:.4f}  val FVU {entry['val/fvu']:.4f}  "
              f"L0 {entry['train/l0']:.1f}  dead {entry['train/dead_fraction']:.1%}")

    # Validation on held-out texts: reconstruction and feature usage at text tokens (not pad/BOS/special).
    name = Site(args.layer, args.component).name
    with model.trace(test_texts) as trace:
        pass
    activation = trace.activations[name]
    mask = trace.text_positions  # BOS only where the tokenizer adds one (SmolLM2 adds none)
    features = sae.encode(activation)
    reconstructed = sae.decode(features)
    rec = reconstruction_metrics(np.array(activation)[mask], np.array(reconstructed)[mask])
    fired = (np.array(features)[mask] != 0).sum(axis=0)
    dead = int((fired == 0).sum())
    print(f"held-out: {int(mask.sum())} tokens, MSE {rec.mse:.4f}, explained variance "
          f"{rec.explained_variance:.3f}, cosine {rec.cosine:.3f}, "
          f"dead features {dead}/{sae.d_hidden} ({dead / sae.d_hidden:.1%})")
    print(f"saved {save_path}")


if __name__ == "__main__":
    main()

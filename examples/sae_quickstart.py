"""Quick start: train a TopK SAE on one layer, load it back, and encode a prompt.

    uv run python examples/sae_quickstart.py                      # default model, ~1000 texts
    uv run python examples/sae_quickstart.py --num-texts 50 --layer 2 --context-length 32 --out /tmp/q

Every size can be shrunk with flags (or SAEPIPE_EXAMPLE_NUM_TEXTS etc., see --help).
Works offline: the texts come from saepipe's built-in corpus.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from saepipe import InterpretableModel, SAEConfig
from saepipe.lm.sites import Site
from saepipe.texts.corpus import builtin_corpus


def env_default(name: str, default: object) -> object:
    """A flag's default, overridable by the environment variable SAEPIPE_EXAMPLE_<NAME>."""
    return type(default)(os.environ.get(f"SAEPIPE_EXAMPLE_{name.upper()}", default))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env_default("model", "default"), help="model spec (default: SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=env_default("layer", 10))
    p.add_argument("--component", default=env_default("component", "mlp"), choices=["mlp", "attn", "output"])
    p.add_argument("--num-texts", type=int, default=env_default("num_texts", 1000))
    p.add_argument("--context-length", type=int, default=env_default("context_length", 64))
    p.add_argument("--expansion-factor", type=int, default=env_default("expansion_factor", 8))
    p.add_argument("--k", type=int, default=env_default("k", 32))
    p.add_argument("--epochs", type=int, default=env_default("epochs", 2))
    p.add_argument("--batch-size", type=int, default=env_default("batch_size", 1024))
    p.add_argument("--out", type=Path, default=Path(env_default("out", "examples_out")))
    return p.parse_args()


def main() -> None:
    import mlx.core as mx  # after saepipe (loads the fast BLAS before mlx)
    import numpy as np

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Load model
    model = InterpretableModel(args.model)
    print(f"{model}")

    # A small offline dataset: passages of the built-in corpus (every 7th, for variety)
    texts = [r.text for r in builtin_corpus()[::7][: args.num_texts]]

    # Train SAE
    config = SAEConfig(
        expansion_factor=args.expansion_factor,
        k=args.k,
        learning_rate=3e-4,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_steps=20,
    )
    save_path = args.out / f"sae_layer{args.layer}_{args.component}.mlx"
    sae = model.train_sae(layer=args.layer, dataset=texts, save_path=save_path, config=config,
                          component=args.component, context_length=args.context_length)
    s = model.last_fit.summary
    print(f"trained on {s['n_train']} activation rows in {s['train_seconds']:.1f}s: "
          f"val FVU {s['val/fvu']:.3f}, L0 {s['val/l0']:.1f}, dead {s['dead_fraction']:.1%}")

    # Load saved SAE and check compatibility
    sae = model.load_sae(save_path)
    if sae.is_compatible(model, layer=args.layer, component=args.component):
        print("✓ SAE is compatible!")

    # Encode activations to features
    name = Site(args.layer, args.component).name  # e.g. model.model.layers.10.mlp
    with model.trace("The capital of France is") as trace:
        pass
    activation = trace.activations[name]
    features = sae.encode(activation)  # sparse: k non-zeros per token
    reconstructed = sae.decode(features)
    num_active = int(mx.sum(features[0, -1] != 0))
    top = mx.argsort(-features[0, -1])[: min(5, args.k)].tolist()
    text = trace.text_positions[0]  # not BOS/special tokens (SmolLM2 adds no BOS; other models do)
    error = np.array(activation[0])[text] - np.array(reconstructed[0])[text]
    mse = float(np.mean(error**2))
    print(f"last token: {num_active}/{sae.d_hidden} features active, strongest {top}")
    print(f"reconstruction MSE (text positions): {mse:.6f}")
    print(f"metadata: layer={sae.metadata['layer']} component={sae.metadata['component']} "
          f"model={sae.metadata['model_name']} hash={sae.metadata['model_hash']}")


if __name__ == "__main__":
    main()

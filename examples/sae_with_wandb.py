"""Train an SAE with Weights & Biases logging (mlxterp's metric names: train/loss, train/l0, ...).

    ./saepipe.sh --extra wandb python examples/sae_with_wandb.py   # installs wandb and keeps it installed
    WANDB_MODE=offline uv run python examples/sae_with_wandb.py
    uv run python examples/sae_with_wandb.py --num-texts 50 --layer 2 --context-length 32

Without WANDB_API_KEY (and without WANDB_MODE) the run is logged offline under ./wandb; upload it
later with `wandb sync wandb/offline-run-*`. Sizes shrink with flags or SAEPIPE_EXAMPLE_<FLAG>.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from saepipe import InterpretableModel, SAEConfig

log = logging.getLogger("sae_with_wandb")


def env_default(name: str, default: object) -> object:
    """A flag's default, overridable by the environment variable SAEPIPE_EXAMPLE_<NAME>."""
    return type(default)(os.environ.get(f"SAEPIPE_EXAMPLE_{name.upper()}", default))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env_default("model", "default"))
    p.add_argument("--layer", type=int, default=env_default("layer", 10))
    p.add_argument("--component", default=env_default("component", "mlp"), choices=["mlp", "attn", "output"])
    p.add_argument("--num-texts", type=int, default=env_default("num_texts", 1000))
    p.add_argument("--context-length", type=int, default=env_default("context_length", 64))
    p.add_argument("--expansion-factor", type=int, default=env_default("expansion_factor", 8))
    p.add_argument("--k", type=int, default=env_default("k", 32))
    p.add_argument("--epochs", type=int, default=env_default("epochs", 2))
    p.add_argument("--batch-size", type=int, default=env_default("batch_size", 1024))
    p.add_argument("--project", default=env_default("project", "saepipe-sae-experiments"))
    p.add_argument("--out", type=Path, default=Path(env_default("out", "examples_out")))
    return p.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if importlib.util.find_spec("wandb") is None:
        print("this example needs the optional `wandb` package: install it with\n"
              "    ./saepipe.sh --extra wandb   (or: pip install 'saepipe[wandb]')\n"
              "then rerun, e.g. WANDB_MODE=offline uv run python examples/sae_with_wandb.py", file=sys.stderr)
        return 2
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("no WANDB_API_KEY: logging offline (set WANDB_MODE=online after `wandb login` to upload)")
    os.environ.setdefault("WANDB_DIR", str(args.out))

    from saepipe.texts.corpus import builtin_corpus

    texts = [r.text for r in builtin_corpus()[::7][: args.num_texts]]
    args.out.mkdir(parents=True, exist_ok=True)
    config = SAEConfig(
        expansion_factor=args.expansion_factor,
        k=args.k,
        learning_rate=3e-4,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_steps=20,
        # Enable W&B logging
        use_wandb=True,
        wandb_project=args.project,
        wandb_name=f"sae_layer{args.layer}_{args.component}",
        wandb_tags=("sae", f"layer{args.layer}", args.component),
    )
    model = InterpretableModel(args.model)
    save_path = args.out / f"sae_wandb_layer{args.layer}_{args.component}.mlx"
    sae = model.train_sae(layer=args.layer, dataset=texts, config=config, component=args.component,
                          save_path=save_path, context_length=args.context_length)
    s = model.last_fit.summary
    print(f"logged {s['steps']} steps to W&B project {args.project!r} ({os.environ['WANDB_MODE']} mode, "
          f"files under {os.environ['WANDB_DIR']}); val FVU {s['val/fvu']:.3f}, L0 {s['val/l0']:.1f}; "
          f"SAE d_hidden {sae.d_hidden} saved to {save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

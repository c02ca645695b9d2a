"""Extraction throughput (tokens/s) of the default model to a middle layer, side by side with
mlx-lm's own forward and with Hugging Face transformers on PyTorch CPU running the same GGUF.

    uv run python benchmarks/extract.py [--layer 15] [--batch 8] [--seq 128] [--rounds 5]
        [--torch-python /tmp/benchvenv/bin/python]

Methods, all float32 on a (batch, seq) block of the same token ids, timed in interleaved rounds
(best of rounds, so a busy machine hurts every method alike):

- saepipe: ``forward(stop_layer=layer, capture=[layer.mlp])`` + copy to numpy (what extract runs);
- mlx-lm blocks: mlx-lm's own ``TransformerBlock.__call__`` for blocks 0..layer;
- mlx-lm full / scaled: ``model(tokens)`` (all blocks + LM head), rate x num_layers / (layer + 1);
- transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` truncated to blocks
  0..layer, MLP output captured by a hook, in a separate interpreter that has torch (a throwaway
  venv: ``python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch==2.13.0
  transformers gguf``); skipped when that interpreter is missing.

Also checks that transformers' activations agree with saepipe's, and times one end-to-end
``extract_split`` (tokenize + forward + float16 shards). Target: saepipe >= 1.5x transformers.

Several sites from one pass (the sweep's extract stage): benchmarks/extract_sites.py.
Results, dated: docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

import saepipe  # noqa: F401  (fast BLAS before mlx)

TORCH_WORKER = r"""
import sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
folder, fname, layer, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
model.model.layers = model.model.layers[: layer + 1]
out = {}
model.model.layers[layer].mlp.register_forward_hook(lambda m, i, o: out.__setitem__("x", o))
print("ready", torch.__version__, flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    ids = torch.from_numpy(np.load(args[0]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.model(input_ids=ids, use_cache=False)
        x = out["x"].float().numpy()
    dt = time.perf_counter() - t0
    if cmd == "dump":
        np.save(args[1], x)
    print(dt, flush=True)
"""


class TorchWorker:
    """transformers in another interpreter, timed on request over a pipe."""

    def __init__(self, python: str, gguf: Path, layer: int, threads: int) -> None:
        self.proc = subprocess.Popen(
            [python, "-c", TORCH_WORKER, str(gguf.parent), gguf.name, str(layer), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        ready = self.proc.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"transformers worker failed to start (exit {self.proc.wait()})")
        self.version = ready.split()[1]

    def run(self, ids_path: Path, dump: Path | None = None) -> float:
        cmd = f"dump {ids_path} {dump}" if dump else f"time {ids_path}"
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _end_to_end(loaded, layer: int, seq: int, batch: int, n_texts: int) -> tuple[int, float]:
    """Rows and seconds of one extract_split over synthetic texts of >= seq tokens each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saepipe.activations.config import ExtractConfig
    from saepipe.activations.extract import extract_split

    words = ["the", "model", "reads", "long", "texts", "about", "rivers,", "cities", "and", "the", "history", "of", "science"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=2 * seq)) for _ in range(n_texts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.parquet"
        pq.write_table(pa.table({"id": pa.array(np.arange(n_texts, dtype=np.int64)), "text": texts,
                                 "source": ["bench"] * n_texts, "split": ["train"] * n_texts}), path)
        cfg = ExtractConfig(context_length=seq, batch_size=batch, max_tokens=n_texts * seq, shard_rows=65536)
        t0 = time.perf_counter()
        manifest = extract_split(loaded, path, Path(tmp) / "out", cfg, "train", site=(layer, "mlp"), progress=False)
        return manifest["n_tokens"], time.perf_counter() - t0


@click.command()
@click.option("--layer", default=15, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--rounds", default=5, show_default=True, help="interleaved timing rounds (best kept)")
@click.option("--torch-python", default="/tmp/benchvenv/bin/python", show_default=True,
              help="an interpreter with torch + transformers + gguf (skipped when missing)")
@click.option("--threads", default=2, show_default=True, help="torch intra-op threads")
@click.option("--e2e-texts", default=32, show_default=True, help="texts for the end-to-end extract run")
def main(layer: int, batch: int, seq: int, rounds: int, torch_python: str, threads: int,
         e2e_texts: int) -> None:
    import mlx.core as mx
    import numpy as np

    from saepipe.lm.forward import forward
    from saepipe.lm.model import default_gguf_path, load_model
    from saepipe.lm.sites import Site

    loaded = load_model("default")
    model, n_layers = loaded.model, loaded.info.num_layers
    site = Site(layer, "mlp")
    ids = np.random.default_rng(0).integers(0, loaded.info.vocab_size, size=(batch, seq)).astype(np.int64)
    tokens = mx.array(ids.astype(np.int32))
    n_tok = batch * seq

    def ours():
        return np.asarray(forward(model, tokens, stop_layer=layer, capture=[site]).activations[site])

    def mlx_lm_blocks():
        h = model.model.embed_tokens(tokens)
        for block in model.model.layers[: layer + 1]:
            h = block(h, "causal")
        mx.eval(h)

    methods = {"saepipe extract forward": ours, "mlx-lm blocks 0..layer": mlx_lm_blocks,
               "mlx-lm full forward": lambda: mx.eval(model(tokens))}
    worker = None
    tmp = Path(tempfile.mkdtemp())
    np.save(tmp / "ids.npy", ids)
    if Path(torch_python).exists():
        try:
            worker = TorchWorker(torch_python, default_gguf_path(), layer, threads)
            methods["transformers (torch CPU)"] = lambda: worker.run(tmp / "ids.npy")
        except (RuntimeError, OSError) as e:
            print(f"transformers skipped: {e}")
    else:
        print(f"transformers skipped: {torch_python} not found (see this script's docstring)")

    best = dict.fromkeys(methods, float("inf"))
    for fn in methods.values():
        fn()  # warm-up (compilation, page faults, torch init)
    for _ in range(rounds):
        for name, fn in methods.items():
            seconds = fn() if name.startswith("transformers") else _timed(fn)
            best[name] = min(best[name], seconds)

    rate = {name: n_tok / s for name, s in best.items()}
    rate["mlx-lm full, scaled to layer"] = rate.pop("mlx-lm full forward") * n_layers / (layer + 1)
    print(f"default model ({loaded.info.model_id}), blocks 0..{layer} of {n_layers}, "
          f"batch {batch}x{seq} float32, best of {rounds} interleaved rounds:")
    ref = rate["saepipe extract forward"]
    for name, r in rate.items():
        print(f"  {name:32s} {r:8.0f} tok/s   saepipe / this = {ref / r:5.2f}x")
    if worker is not None:
        worker.run(tmp / "ids.npy", dump=tmp / "torch.npy")
        theirs, mine = np.load(tmp / "torch.npy"), ours()
        err = np.abs(theirs - mine).max() / np.abs(mine).max()
        print(f"  transformers {worker.version}: max |diff| / max |act| at layer {layer} mlp = {err:.2e}")
        print(f"  target saepipe / transformers >= 1.5: {ref / rate['transformers (torch CPU)']:.2f}x")
        worker.close()
    rows, seconds = _end_to_end(loaded, layer, seq, batch, e2e_texts)
    print(f"  end-to-end extract_split ({rows} rows, float16 shards): {rows / seconds:8.0f} tok/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

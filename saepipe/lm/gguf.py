"""Read a Llama-family GGUF file into an mlx-lm ``llama.Model`` and a Hugging Face fast tokenizer.

``mx.load(path, return_metadata=True)`` does the parsing: Q4_0/Q4_1/Q8_0 tensors come back as MLX
affine-quantized triplets (``.weight`` packed uint32, ``.scales``, ``.biases``, group size 32), other
types as float arrays. This module maps llama.cpp names to mlx-lm names, undoes llama.cpp's rotary
row permutation of the Q/K projections (so mlx-lm's default ``rope_traditional=False`` is right),
and rebuilds the tokenizer from the ``tokenizer.ggml.*`` metadata.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from saepipe.lm.gguf_check import check_gguf

log = logging.getLogger(__name__)

#: GGUF block size of the formats MLX keeps quantized (Q4_0, Q4_1, Q8_0).
GGUF_GROUP_SIZE = 32

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|scales|biases|bias)$")

#: llama.cpp token types (``tokenizer.ggml.token_type``).
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# Llama-3 style pre-tokenizer regex (llama.cpp "llama-bpe"), as in Meta's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFFile(NamedTuple):
    tensors: dict[str, Any]
    """Tensors by GGUF name (quantized ones as ``name.weight``/``name.scales``/``name.biases``)."""
    metadata: dict[str, Any]
    """GGUF key/value metadata; scalar ``mx.array`` values are converted to Python numbers."""


def read_gguf(path: str | Path) -> GGUFFile:
    """Read a GGUF file's tensors and metadata (scalars as Python values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    check_gguf(path)  # MLX's C reader trusts the file: a malformed one would crash the process
    try:
        tensors, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as exc:  # MLX raises a bare ValueError/RuntimeError on malformed files
        raise ValueError(f"cannot read {path} as GGUF: {exc}") from exc
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in meta.items()}
    return GGUFFile(tensors, meta)


def _arch_key(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(f"llama.{key}", default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks llama.{key}")
    return value


def check_llama(meta: dict[str, Any], path: str | Path = "") -> None:
    """Raise a clear error unless the GGUF architecture is ``llama``."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path or 'file'}: only 'llama' "
            "(Llama, SmolLM, TinyLlama, ...) is supported; use an mlx-lm folder or hub id instead"
        )


def llama_args(meta: dict[str, Any], tensors: dict[str, Any]) -> Any:
    """Build ``mlx_lm.models.llama.ModelArgs`` from GGUF metadata (tied embeddings iff no output)."""
    d_model = int(_arch_key(meta, "embedding_length"))
    n_heads = int(_arch_key(meta, "attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = tensors["token_embd.weight"].shape[0]
    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    elif scaling_type != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r} (only none/linear)")
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF has rope_freqs (Llama-3.1 rope scaling), which is not supported")
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=d_model,
        num_hidden_layers=int(_arch_key(meta, "block_count")),
        intermediate_size=int(_arch_key(meta, "feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_arch_key(meta, "attention.layer_norm_rms_epsilon")),
        vocab_size=int(vocab),
        max_position_embeddings=meta.get("llama.context_length"),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
    )


def mlx_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.scales``) to its mlx-lm name."""
    m = _TENSOR_RE.match(gguf_name)
    if m is None:
        raise ValueError(f"unexpected GGUF tensor name {gguf_name!r}")
    layer, base, suffix = m.groups()
    table = _GLOBAL_NAMES if layer is None else _BLOCK_NAMES
    if base not in table:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{table[base]}.{suffix}"


def unpermute_rotary(w: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (HF rotate-half layout back from interleaved pairs).

    llama.cpp's converter reshapes rows to (heads, 2, head_dim/2) and swaps the last two axes; this is
    the inverse. It permutes rows only, so it applies equally to packed weights, scales and biases.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quant_bits(weight: Any, scales: Any, group_size: int = GGUF_GROUP_SIZE) -> int:
    """Bits per value of a packed uint32 weight: packed words x 32 / (groups x group size)."""
    bits, rem = divmod(weight.shape[-1] * 32, scales.shape[-1] * group_size)
    if rem or bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"cannot infer quantization bits from shapes {weight.shape}, {scales.shape}")
    return bits


class LlamaWeights(NamedTuple):
    weights: dict[str, Any]
    """mlx-lm parameter name -> array (quantized layers keep ``weight``/``scales``/``biases``)."""
    bits: dict[str, int]
    """mlx-lm module path -> bits, for each layer still quantized."""


def llama_weights(tensors: dict[str, Any], args: Any, *, dequantize: bool) -> LlamaWeights:
    """Rename GGUF tensors for mlx-lm, unpermute Q/K, and dequantize to float32 if asked.

    With ``dequantize=False`` quantized layers stay packed and the other float tensors (llama.cpp
    keeps norms in F32) take the scales' dtype, as in a quantized mlx-lm model; a GGUF without
    quantized tensors keeps its stored float dtypes.
    """
    renamed = {mlx_name(k): v for k, v in tensors.items()}
    scale_dtypes = {v.dtype for k, v in renamed.items() if k.endswith(".scales")}
    float_dtype = mx.float32 if dequantize else next(iter(scale_dtypes), None)
    out: dict[str, Any] = {}
    bits: dict[str, int] = {}
    for name, value in renamed.items():
        module, suffix = name.rsplit(".", 1)
        if suffix in ("scales", "biases"):
            continue
        if f"{module}.scales" in renamed:
            scales, biases = renamed[f"{module}.scales"], renamed[f"{module}.biases"]
            b = quant_bits(value, scales)
            if dequantize:
                # float32 scales: MLX's CPU float16 arithmetic is slower than float32
                out[name] = mx.dequantize(value, scales.astype(mx.float32),
                                          biases.astype(mx.float32), GGUF_GROUP_SIZE, b)
            else:
                out[name], out[f"{module}.scales"], out[f"{module}.biases"] = value, scales, biases
                bits[module] = b
        else:
            floating = mx.issubdtype(value.dtype, mx.floating)
            out[name] = value.astype(float_dtype) if floating and float_dtype else value
    for proj, heads in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)):
        for name in [n for n in out if f".self_attn.{proj}." in n]:
            out[name] = unpermute_rotary(out[name], heads)
    return LlamaWeights(out, bits)


def build_llama(args: Any, lw: LlamaWeights) -> Any:
    """Instantiate ``llama.Model(args)``, quantize the layers named in ``lw.bits``, load weights."""
    model = llama.Model(args)
    if lw.bits:
        def predicate(path: str, _module: Any) -> bool | dict:
            b = lw.bits.get(path)
            return False if b is None else {"group_size": GGUF_GROUP_SIZE, "bits": b}

        nn.quantize(model, class_predicate=predicate)
    model.load_weights(list(lw.weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def _pre_tokenizer(pre: str) -> Any:
    """The Hugging Face pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # StarCoder-style: each digit alone, then GPT-2 regex (as SmolLM2's tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in ("gpt-2", "default"):
        log.warning("GGUF pre-tokenizer %r not known; using plain GPT-2 byte-level splitting", pre)
    return byte_level


def gguf_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``PreTrainedTokenizerFast`` rebuilt from ``tokenizer.ggml.*`` metadata (byte-level BPE only).

    BOS/EOS are added by ``encode`` exactly when ``tokenizer.ggml.add_bos_token``/``add_eos_token``
    say so (SmolLM2: neither, matching its Hugging Face tokenizer). Control tokens become special
    tokens, so ``<|im_start|>`` in text maps to one id and ``skip_special_tokens`` drops them.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else [int(t) for t in types.tolist()]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre, post = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
        specials = [(t, tokens.index(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{pre}$A{post}", pair=f"{pre}$A{post} $B:1{post}", special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
        model_max_length=int(meta.get("llama.context_length", 2048)),
    )


def load_gguf(path: str | Path, *, dequantize: bool) -> tuple[Any, Any]:
    """Load a Llama GGUF file as ``(mlx-lm model, PreTrainedTokenizerFast)``."""
    gguf = read_gguf(path)
    check_llama(gguf.metadata, path)
    args = llama_args(gguf.metadata, gguf.tensors)
    model = build_llama(args, llama_weights(gguf.tensors, args, dequantize=dequantize))
    return model, gguf_tokenizer(gguf.metadata)

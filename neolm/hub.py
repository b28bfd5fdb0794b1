"""Turn a model reference into a local folder: a path, a Hugging Face hub id, or a ModelScope id.

    ./my-model                      a local folder (config.json + weights)
    EleutherAI/pythia-160m          the Hugging Face hub (revision= picks a branch, tag or commit,
                                    e.g. Pythia's training steps "step143000"); cached by huggingface_hub
    modelscope:AI-ModelScope/gpt-neo-1B3   ModelScope, through the optional `modelscope` package
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from neolm.errors import NeolmError

log = logging.getLogger(__name__)

# What a checkpoint folder needs: config, one weight layout (first found wins), optional tokenizer.
CONFIG_FILE = "config.json"
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "*.safetensors"),
    ("model.safetensors", None),
    ("pytorch_model.bin.index.json", "*.bin"),
    ("pytorch_model.bin", None),
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # fmt: skip
OPTIONAL_FILES = ("generation_config.json",) + TOKENIZER_FILES
MODELSCOPE_PREFIX = "modelscope:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(model: str | os.PathLike, revision: str | None = None, weights: bool = True) -> Path:
    """The local folder holding `model`, downloading it first when it is a hub id (weights=False: from the
    Hugging Face hub, only its config and tokenizer files)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NeolmError(f"{text} is a file; pass the checkpoint folder that holds config.json and the weights")
    if text.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(text[len(MODELSCOPE_PREFIX) :], revision)
    if _REPO_ID.match(text) and not text.startswith((".", "~")):
        return _from_hf_hub(text, revision, weights)
    raise NeolmError(f"no such model folder: {text} (and it is not a hub id like EleutherAI/pythia-160m)")


def _describe_needs() -> str:
    weights = " or ".join(name for name, _ in WEIGHT_LAYOUTS)
    return f"{CONFIG_FILE} and one of {weights} (with its shards)"


def _weight_patterns(files: list[str]) -> list[str]:
    """The files to download for the first weight layout that the repo has."""
    for name, shards in WEIGHT_LAYOUTS:
        if name in files:
            return [name] + ([shards] if shards else [])
    raise NeolmError(f"the repository has no weights neolm can read; it needs {_describe_needs()}")


def _from_hf_hub(repo_id: str, revision: str | None, weights: bool = True) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - a runtime dependency
        raise NeolmError("huggingface_hub is not installed: pip install huggingface_hub") from None
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        if not _reachable(huggingface_hub.constants.ENDPOINT):
            raise ConnectionError(f"{huggingface_hub.constants.ENDPOINT} is unreachable")
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        patterns = [CONFIG_FILE, *OPTIONAL_FILES, *(_weight_patterns(files) if weights else [])]
        log.info("downloading %s from the Hugging Face hub: %s", where, ", ".join(patterns))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise NeolmError(f"{where} was not found on the Hugging Face hub ({type(e).__name__})") from None
    except NeolmError:
        raise
    except Exception as e:  # network failures surface as several exception types
        log.info("hub unreachable (%s); looking in the local cache", e)
    try:  # offline: a previously downloaded snapshot still works
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        raise NeolmError(
            f"cannot reach the Hugging Face hub to download {where}, and it is not in the local cache; "
            f"it needs {_describe_needs()}. Connect to the network, or pass a local folder with these files"
        ) from None


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an offline machine fails at once instead of after the client's retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True  # the proxy decides; let the client try
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _from_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise NeolmError(
            f"{MODELSCOPE_PREFIX}{model_id} is on ModelScope, which needs the optional package: "
            "pip install 'neolm[modelscope]'"
        ) from None
    try:
        kwargs = {"revision": revision} if revision else {}
        return Path(snapshot_download(model_id, **kwargs))
    except Exception as e:
        raise NeolmError(
            f"cannot download {model_id} from ModelScope ({type(e).__name__}: {e}); it needs {_describe_needs()}"
        ) from None

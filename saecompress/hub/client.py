"""The ``huggingface_hub`` client as saecompress uses it: endpoint/token handling, Xet, one-line errors."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

from .._version import __version__
from ..errors import SaeCompressError, first_line

_TRUE = {"1", "on", "yes", "true"}


def hub_endpoint(endpoint: str | None) -> str:
    """The endpoint a call goes to: ``endpoint``, else ``HF_ENDPOINT`` as ``huggingface_hub`` read it."""
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def make_api(endpoint: str | None, token: str | None):
    """An ``HfApi`` for ``endpoint`` (default: ``HF_ENDPOINT``) and ``token`` (default: ``HF_TOKEN``/login)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(endpoint), token=token, library_name="saecompress",
                 library_version=__version__)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level failures of the HTTP client under ``huggingface_hub`` (httpx2 in 2.x, httpx in 1.x)."""
    found: list[type[BaseException]] = [ConnectionError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as ``huggingface_hub`` sees it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def plain_lfs_uploads(enabled: bool) -> Iterator[None]:
    """Upload large files over the Git LFS protocol instead of Xet while the block runs (if ``enabled``).

    ``huggingface_hub`` reads ``HF_HUB_DISABLE_XET`` once, at import; it checks the resulting
    ``constants.HF_HUB_DISABLE_XET`` on every upload, so flipping it here is the per-call switch.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = before or enabled
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


def xet_disabled_by_env() -> bool:
    """True when ``HF_HUB_DISABLE_XET`` is set now (even if set after ``huggingface_hub`` was imported)."""
    return os.environ.get("HF_HUB_DISABLE_XET", "").strip().lower() in _TRUE


def is_missing_xet_error(err: BaseException) -> bool:
    """True for the error ``hf_xet`` raises when a server has no Xet token route (a non-Xet hub)."""
    text = str(err)
    return "xet-write-token" in text and "404" in text


def content_ids(local: str | os.PathLike, entry) -> tuple[str, str]:
    """``(local id, listed id)`` of a file and the Hub's listing of it (a ``RepoFile``).

    LFS files are identified by the sha256 of their content, regular files by their git blob id.
    """
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    with open(local, "rb") as f:
        if entry.lfs is not None:
            return sha_fileobj(f).hex(), entry.lfs.sha256
        return git_hash(f.read()), entry.blob_id


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str | None, *, path: str | None = None) -> Iterator[None]:
    """Turn ``huggingface_hub``/network failures into one-line ``SaeCompressError``s naming repo and revision."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = hub_endpoint(endpoint)
    rev = revision or "main"
    try:
        yield
    except SaeCompressError:
        raise
    except HFValidationError as err:
        raise SaeCompressError(f"{repo_id}@{rev}: {first_line(err)}") from None
    except RevisionNotFoundError:
        raise SaeCompressError(f"revision {rev!r} not found in {repo_id} on {where}; give an existing branch, "
                               "tag or commit sha after '@'") from None
    except RepositoryNotFoundError:
        raise SaeCompressError(f"repository {repo_id} not found on {where} (or it is private and no valid token "
                               "was sent); check the name, or pass --token / set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise SaeCompressError(
            f"{repo_id}@{rev} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset "
            "HF_HUB_OFFLINE, or pull it once while online" if is_offline() else
            f"cannot reach the Hub at {where} to fetch {repo_id}@{rev}, and it is not in the local cache; "
            "check the network and HF_ENDPOINT / --endpoint") from None
    except EntryNotFoundError:
        what = f"{path!r}" if path else "a requested file"
        raise SaeCompressError(f"{what} not found in {repo_id}@{rev} on {where}; check the hookpoint/path") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise SaeCompressError(f"authentication failed for {repo_id} on {where} (HTTP 401: token missing or "
                                   "invalid); pass --token or set HF_TOKEN") from None
        if status == 403:
            raise SaeCompressError(f"permission denied for {repo_id} on {where} (HTTP 403); use a token with "
                                   "write access to this repo or namespace") from None
        raise SaeCompressError(f"the Hub at {where} answered HTTP {status} for {repo_id}@{rev}: "
                               f"{first_line(err)}") from None
    except (OfflineModeIsEnabled, *transport_errors()) as err:
        raise SaeCompressError(
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be reached on {where}; unset HF_HUB_OFFLINE to talk "
            "to the Hub" if is_offline() else
            f"cannot reach the Hub at {where} for {repo_id} ({first_line(err)}); check the network and "
            "HF_ENDPOINT / --endpoint") from None

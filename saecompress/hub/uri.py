"""``hf://owner/repo[/hookpoint...][@revision]`` URIs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SaeCompressError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HfUri:
    """A parsed hub reference: ``repo_id`` (``owner/repo``), optional ``hookpoint`` and ``revision``."""

    repo_id: str
    hookpoint: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return (f"hf://{self.repo_id}" + (f"/{self.hookpoint}" if self.hookpoint else "")
                + (f"@{self.revision}" if self.revision else ""))


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``owner/name`` (huggingface_hub's rules), else ``SaeCompressError``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise SaeCompressError(f"{repo_id!r} is not a Hub repo id; write owner/name with letters, digits, '-', '_' "
                               "or '.' (not at either end, no '--' or '..'), e.g. alice/my-sae-expander")
    return repo_id


def parse_hf_uri(uri: str) -> HfUri:
    """Parse ``hf://owner/repo[/hookpoint...][@revision]`` (the ``hf://`` prefix is optional).

    The hookpoint is the path of a subfolder (``layers.3``, ``blocks.8.hook_resid_post``, or nested
    ``a/b``); the revision is a branch, tag or commit sha and comes last (it may contain ``/``,
    e.g. ``refs/pr/1``).
    """
    text = uri[len("hf://"):] if uri.startswith("hf://") else uri
    path, _, revision = text.partition("@")
    parts = path.strip("/").split("/")
    bad = (len(parts) < 2 or "" in parts or any(p in (".", "..") for p in parts)
           or not all(_NAME.fullmatch(p) for p in parts[:2]) or ("@" in text and not revision)
           or "@" in revision)
    if bad:
        raise SaeCompressError(f"{uri!r} is not a hub reference; write hf://owner/repo[/hookpoint][@revision] "
                               "(e.g. hf://alice/sae-expander/layers.3@main)")
    hookpoint = "/".join(parts[2:]) or None
    return HfUri(repo_id="/".join(parts[:2]), hookpoint=hookpoint, revision=revision or None)

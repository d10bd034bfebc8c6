"""A LoRA file of a pinned hub repository, resolved through the standard Hugging Face cache.

Planning needs the file itself (its header says which components it changes), so it is looked up
when the graph is built: from the cache without any request when it is there, else downloaded into
the cache where the Hub may be used, else the one `sdbuild fetch` error of every hub input.
"""

from __future__ import annotations

from pathlib import Path

from builder.errors import UserError, first_line
from builder.hub.cache import HubRef, _unreachable, not_cached
from builder.hub.layout import RepoKind


def lora_ref(repo_id: str, revision: str) -> HubRef:
    return HubRef(repo_id, revision, RepoKind.LORA)


def cached_lora(ref: HubRef, weight_name: str, *, download: bool = True) -> Path:
    """The cache's file `weight_name` of `ref`, resolved into the repository's blobs/ (a tampered
    cache cannot point a build elsewhere); downloaded first when missing, `download` allows and the
    Hub is reachable."""
    from huggingface_hub import constants, hf_hub_download

    try:
        found = Path(hf_hub_download(ref.repo_id, weight_name, revision=ref.revision, local_files_only=True))
    except Exception:  # not in the cache (the client's error names the case; ours names the fix)
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
        if not download or why is not None:
            raise not_cached(ref, why or "not downloaded yet") from None
        try:
            found = Path(hf_hub_download(ref.repo_id, weight_name, revision=ref.revision))
        except Exception as error:  # network, auth, no such repository, revision or file
            raise not_cached(ref, first_line(error)) from None
    snapshot = found.parents[len(Path(weight_name).parts) - 1]  # <cache>/models--owner--name/snapshots/<commit>
    blobs = (snapshot.parent.parent / "blobs").resolve()
    real = found.resolve()
    if not real.is_relative_to(blobs) or not real.is_file():
        raise UserError(
            f"the Hugging Face cache entry {weight_name} of {ref} does not lead to a file in its blobs/ ({real})",
            hint=f"delete {found.parent} and fetch it again with `sdbuild fetch`",
        )
    return real

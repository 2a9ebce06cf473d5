"""Failures of a Hugging Face download as APIErrors that say what to do next.

Hub answers (missing repo or revision, gated repo, refused token, rate limit, 5xx), an
unreachable hub, a full disk and a stopped download each get their own status, code and advice.
"""

from __future__ import annotations

from loguru import logger

from common.downloads.hubcompat import entry_not_found_error, response_status, transport_errors
from common.downloads.request import DownloadRequest
from common.errors import (
    APIError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)


class DownloadCancelled(Exception):
    """Raised inside the transfer when the download is asked to stop."""


def gated_error(req: DownloadRequest, endpoint: str, *, has_token: bool) -> APIError:
    page = f"{endpoint}/{req.repo_id}"
    if has_token:
        return APIError(
            f"'{req.repo_id}' is gated and the token has no access to it: accept its terms at {page} with the "
            "token's account (or use a token of an account that did), then retry.",
            status=403, code="gated_repo", param="token",
        )
    return APIError(
        f"'{req.repo_id}' is gated: accept its terms at {page} while logged in, then send a read token of that "
        "account ('token' field, --token, or HF_TOKEN).", status=401, code="gated_repo", param="token",
    )


def hub_error(exc: BaseException, req: DownloadRequest, endpoint: str) -> APIError:
    """A failure while talking to the hub or writing files, as an APIError that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = req.repo_id
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, DownloadCancelled):
        return ServiceUnavailableError(
            f"The download of '{repo}' was stopped (the server is shutting down); the bytes so far are kept. "
            "Send the same request again to resume.", code="download_cancelled",
        )
    if isinstance(exc, GatedRepoError):
        return gated_error(req, endpoint, has_token=bool(req.token) or _has_stored_token())
    if isinstance(exc, RevisionNotFoundError):
        return NotFoundError(
            f"'{repo}' has no revision '{req.revision}'. Use one of its branches, tags or commits, or leave "
            "'revision' out for the default branch.", param="revision", code="revision_not_found",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return NotFoundError(
            f"'{repo}' ({req.repo_type}) was not found on {endpoint}. Check the owner/name spelling and repo_type; "
            "a private repo also needs a token with access.", param="repo_id", code="repo_not_found",
        )
    if isinstance(exc, entry_not_found_error()):
        return APIError(f"A file of '{repo}' disappeared from the hub during the download. Send the request again.",
                        status=502, code="hub_error")
    if isinstance(exc, HfHubHTTPError):
        status = response_status(exc)
        if status == 401:
            return APIError("The hub rejected the token (401). Check it at https://huggingface.co/settings/tokens "
                            "or leave 'token' out for public repos.", status=401, code="hub_unauthorized", param="token")
        if status == 403:
            return APIError(f"The hub refused access to '{repo}' (403). Use a token whose account may read it.",
                            status=403, code="hub_forbidden", param="token")
        if status == 429:
            return RateLimitError(f"The hub is rate-limiting downloads of '{repo}'. Wait a few minutes, then retry; "
                                  "a token raises the limit.", headers={"Retry-After": "60"})
        return APIError(
            f"The hub at {endpoint} answered {status or 'an error'} while downloading '{repo}'. Send the same "
            "request again later: a download that already started resumes where it stopped.", status=502, code="hub_error",
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return ServiceUnavailableError(
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE is set). Unset it and restart to download.",
            code="hub_offline",
        )
    if isinstance(exc, transport_errors()):
        return ServiceUnavailableError(
            f"Cannot reach the Hugging Face Hub at {endpoint} for '{repo}' ({type(exc).__name__}: {str(exc)[:200]}). "
            "Check the network and proxy settings, or point model.hf_endpoint / HF_ENDPOINT at a reachable mirror, "
            "then send the request again (what was fetched is kept and resumed).", code="hub_unreachable", retry_after=30,
        )
    if isinstance(exc, OSError):
        return APIError(
            f"Writing the download of '{repo}' failed ({type(exc).__name__}: {str(exc)[:200]}). Check free space "
            "and permissions of the model directory, then retry.", status=507, code="download_write_failed",
        )
    logger.opt(exception=exc).error("Unexpected failure while downloading {}", repo)
    return APIError(f"Downloading '{repo}' failed unexpectedly ({type(exc).__name__}). Retry; report it if it "
                    "persists.", status=500, code="download_failed")


def _has_stored_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None

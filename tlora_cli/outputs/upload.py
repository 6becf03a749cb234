"""`--push-to-hub`: publish a finished output folder as one commit, through huggingface_hub.

Token and endpoint come from wherever huggingface_hub finds them (HF_TOKEN, `hf auth login`, HF_ENDPOINT).
A push runs after the output is complete on disk; when it fails the folder stays, and the one-line error
gives the `hf upload` command that finishes the job later.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import TloraError, is_connection_error
from ..options import Options, option


def _repo_id(value: str) -> str | None:
    """Checked before any work: a typo, or `--push-to-hub -q`, would otherwise surface after a long run."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # only pushes need huggingface_hub

    try:
        validate_repo_id(value)
    except HFValidationError:
        return f"must be a hub repo id like org/name, got {value!r}"
    return f"must be a hub repo id like org/name, got {value!r}" if value.startswith("-") else None


@dataclass
class PublishOptions(Options):
    """Where OUT goes once written (--push-to-hub)."""

    push_to_hub: str | None = option(
        None,
        "Then publish OUT to this hub model repo (created if needed) in one commit; token and endpoint as "
        "huggingface_hub finds them.",
        "--push-to-hub",
        metavar="REPO_ID",
        check=_repo_id,
    )
    private: bool = option(False, "With --push-to-hub: create the repo private.", "--private")
    create_pr: bool = option(False, "With --push-to-hub: open a pull request instead.", "--create-pr")

    def check_together(self) -> None:
        if self.push_to_hub is None and (self.private or self.create_pr):
            raise TloraError("--private and --create-pr go with --push-to-hub REPO_ID")


def hf_upload_command(folder: Path, repo_id: str, private: bool = False, create_pr: bool = False) -> str:
    """The `hf upload` command that makes the same commit from the shell."""
    args = ["hf", "upload", repo_id, str(folder), ".", "--repo-type", "model"]
    args += ["--private"] if private else []
    args += ["--create-pr"] if create_pr else []
    return shlex.join(args)


def _reason(error: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(error, LocalTokenNotFoundError):
        return "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return f"not authorised ({status}): log in with `hf auth login` or set HF_TOKEN to a token that can write"
    text = str(error).strip().splitlines()
    detail = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    if is_connection_error(error):
        from huggingface_hub import constants

        return f"cannot reach {constants.ENDPOINT} ({detail})"
    return detail


def push_folder(
    folder: Path, repo_id: str, private: bool = False, create_pr: bool = False, message: str | None = None
) -> str:
    """create_repo (exist_ok), then huggingface_hub's upload_folder: one commit, or with hf_xet installed a streamed
    upload in several commits that a rerun resumes (a merged 7B is GBs); returns the commit's (or PR's) URL."""
    from huggingface_hub import HfApi  # only pushes need the hub client

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message or f"Upload {folder.name} with tlora",
            repo_type="model",
            create_pr=create_pr,
        )
    except Exception as e:  # network, auth, validation: the output is safe on disk either way
        raise TloraError(
            f"could not push {folder} to {repo_id}: {_reason(e)}; the output is kept: finish later with "
            f"`{hf_upload_command(folder, repo_id, private, create_pr)}`"
        ) from e
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or repo_id

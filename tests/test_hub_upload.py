"""--push-to-hub without a network: the commit it would make, and the failures that keep the output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError


@dataclass
class FakeCommit:
    commit_url: str
    pr_url: str | None = None


@pytest.fixture
def hub(monkeypatch):
    """HfApi.create_repo and upload_folder recorded instead of sent (upload_folder's files read as it would)."""
    calls: dict[str, list] = {"create_repo": [], "create_commit": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        calls["create_commit"].append({"repo_id": repo_id, "files": files, **kwargs})
        pr = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return FakeCommit(f"https://huggingface.co/{repo_id}/commit/abc123", pr)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_init_pushes_the_adapter_in_one_commit(model_factory, tiny_init, tmp_path, hub):
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--budget-rank", 2, "--push-to-hub", "me/tiny", "--private")
    assert result.code == 0, result.stderr
    assert hub["create_repo"] == [{"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}]
    [commit] = hub["create_commit"]
    assert commit["repo_id"] == "me/tiny" and commit["create_pr"] is False and commit["repo_type"] == "model"
    assert set(commit["files"]) == {p.name for p in out.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tlora_metadata.json"} <= set(
        commit["files"]
    )
    for name, content in commit["files"].items():
        assert (out / name).read_bytes() == content


def test_export_opens_a_pull_request(model_factory, tiny_init, run_cli, tmp_path, hub):
    adapter = tmp_path / "adapter"
    assert tiny_init(model_factory("llama"), adapter, "--budget-rank", 2).code == 0
    out = tmp_path / "vllm"
    result = run_cli("export", adapter, "-o", out, "--push-to-hub", "org/tiny-vllm", "--create-pr")
    assert result.code == 0, result.stderr
    assert hub["create_repo"][0]["private"] is None  # the hub's default visibility
    [commit] = hub["create_commit"]
    assert commit["create_pr"] is True and "adapter_config.json" in commit["files"]
    assert "https://huggingface.co/org/tiny-vllm/discussions/1" in result.stderr


@dataclass
class FakeResponse:
    """What HfHubHTTPError reads from a response, whichever HTTP client huggingface_hub uses."""

    status_code: int
    headers: dict
    request: object = None


def _denied(self, repo_id, **kwargs):
    raise HfHubHTTPError("401 Client Error: Unauthorized", response=FakeResponse(401, {}))


@pytest.mark.parametrize("failure", ["unauthorised", "offline", "unreachable"])
def test_failed_push_keeps_the_output_and_says_how_to_finish(failure, model_factory, tiny_init, tmp_path, monkeypatch):
    if failure == "unauthorised":
        monkeypatch.setattr(HfApi, "create_repo", _denied)
        reason = "not authorised (401)"
    elif failure == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        reason = "offline mode"
    else:  # nothing listens on port 9 of this machine: a refused connection, not a call to the real hub
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        reason = "cannot reach http://127.0.0.1:9"
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--budget-rank", 2, "--push-to-hub", "me/tiny", "--create-pr")
    assert result.code == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert reason in result.stderr
    assert f"hf upload me/tiny {out} . --repo-type model --create-pr" in result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


def test_push_flags_need_a_repo(model_factory, tiny_init, tmp_path):
    result = tiny_init(model_factory("llama"), tmp_path / "a", "--private")
    assert result.code == 1 and "--push-to-hub REPO_ID" in result.stderr and not (tmp_path / "a").exists()

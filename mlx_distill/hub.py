"""Upload an export folder to the Hugging Face Hub (``--push-to-hub``).

``huggingface_hub`` does the work: ``create_repo`` (private with ``--private``),
then ``upload_folder``. The token comes from ``HF_TOKEN`` or a saved
``huggingface-cli login``; it is handed to the client object only and is never
printed, logged or written (errors from the client are scrubbed of it too).
``--dry-run`` lists what would be uploaded and sends nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError, DistillError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")
NO_TOKEN = (
    "--push-to-hub needs a Hugging Face token with write access, and none was found. Log in once "
    "with `huggingface-cli login` (or `hf auth login`), or set it for this shell: "
    "export HF_TOKEN=hf_... . Use --dry-run to see what would be uploaded without a token."
)


def check_repo_id(repo: str) -> str:
    if not _REPO_ID.match(repo or ""):
        raise ConfigError(
            f"--push-to-hub {repo!r}: expected a Hub repo id such as your-name/my-distilled-model"
        )
    return repo


def find_token() -> str | None:
    """``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), else the saved login token."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def check_can_push(repo: str, dry_run: bool) -> None:
    """Fail fast, before any export work: repo id, library, token, offline mode."""
    check_repo_id(repo)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub: pip install huggingface-hub") from None
    if dry_run:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError("--push-to-hub: HF_HUB_OFFLINE is set; unset it to upload (or use --dry-run)")
    if not find_token():
        raise ConfigError(NO_TOKEN)


def plan(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file ``upload_folder`` would send, sorted."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in files)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def dry_run(folder: Path, repo: str, private: bool, echo: Callable[[str], None] = print) -> list[tuple[str, int]]:
    """List what ``push`` would upload; sends nothing and needs no token."""
    files = plan(folder)
    vis = "private" if private else "public"
    echo(f"dry run: would create {vis} repo {check_repo_id(repo)} (if missing) and upload "
         f"{len(files)} files, {human(sum(s for _, s in files))}:")
    for name, size in files:
        echo(f"  {name}  ({human(size)})")
    echo("dry run: nothing was sent")
    return files


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push(
    folder: Path,
    repo: str,
    private: bool = False,
    echo: Callable[[str], None] = print,
    token: str | None = None,
    endpoint: str | None = None,
    api_factory: Callable[..., Any] | None = None,
) -> str:
    """Create ``repo`` (private if asked) and upload ``folder``; returns the repo URL.

    ``endpoint`` (default: ``HF_ENDPOINT`` / huggingface.co) and ``api_factory``
    (default ``huggingface_hub.HfApi``) are for tests against a loopback server.
    """
    check_repo_id(repo)
    token = token or find_token()
    if not token:
        raise ConfigError(NO_TOKEN)
    if api_factory is None:
        from huggingface_hub import HfApi as api_factory
    api = api_factory(endpoint=endpoint, token=token, library_name="mlx-distill")
    files = plan(folder)
    echo(f"hub: uploading {len(files)} files ({human(sum(s for _, s in files))}) to {repo} "
         f"({'private' if private else 'public'})")
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model exported by mlx-distill")
    except Exception as e:  # the client raises many HTTP/OS error types; keep the token out
        raise DistillError(
            f"--push-to-hub {repo}: upload failed: {_scrub(f'{type(e).__name__}: {e}', token)}"
        ) from None
    url_text = str(getattr(url, "url", url) or f"https://huggingface.co/{repo}")
    echo(f"hub: pushed to {url_text}")
    return url_text


SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml", ".model")


def assert_no_secrets(folder: Path) -> None:
    """Raise if any known secret (env tokens, the saved Hub login) appears in a text file of ``folder``."""
    secrets = {os.environ.get(v, "") for v in SECRET_VARS}
    try:
        from huggingface_hub import get_token

        secrets.add(get_token() or "")
    except ImportError:
        pass
    secrets = {s for s in secrets if len(s) >= 8}
    if not secrets:
        return
    for p in Path(folder).rglob("*"):
        if p.is_file() and p.suffix in _TEXT_SUFFIXES and p.stat().st_size < 64 * 2**20:
            data = p.read_bytes()
            if any(s.encode() in data for s in secrets):
                raise DistillError(
                    f"refusing to export: {p.name} contains a secret token (an API key or Hub token); "
                    "nothing was written to --out. Remove it from the adapter/run configs."
                )

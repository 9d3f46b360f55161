"""Inputs and outputs that are URLs (``s3://``, ``gs://``, ``az://``, ``file://``): fsspec and its
maintained backends (s3fs, gcsfs, adlfs), installed as extras (``pip install rexnet-serving[s3]``).

Why fsspec: one listing/reading/writing API over every object store, with each backend's own
credential chain (AWS_* variables, IAM roles for service accounts, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*), endpoints (``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible stores) and retries;
nothing is imported, and nothing contacted, until a URL is used.

Results are never written in place on an object store: a run writes (and repairs, and resumes) a local
staging copy, and ``RemoteOutput.commit`` uploads the whole file as one object (a single PUT, or a
multipart upload completed only at the end, both atomic on S3, GCS and Azure). A pod killed at any
moment leaves the previous committed object, which is a valid, shorter result file: the next attempt
downloads it and resumes, redoing at most what was classified since that commit.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .summary import UsageError

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
EXTRA_FOR = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
             "abfss": "azure", "adl": "azure"}
READ_ATTEMPTS = 3
STAGING_ENV = "REXNET_STAGING_DIR"  # where remote outputs are staged (default: the temp folder)


def is_url(text: str) -> bool:
    """A URL fsspec should open (``file://`` included); plain paths are not."""
    return bool(URL.match(text))


def file_url_path(text: str) -> Optional[Path]:
    """The local path of a ``file://`` URL, None for anything else."""
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse
        return Path(unquote(urlparse(text).path))
    return None


def filesystem(url: str) -> Tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; UsageError naming the extra when its backend
    is not installed."""
    scheme = URL.match(url).group(1).lower()
    try:
        import fsspec
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = EXTRA_FOR.get(scheme, "s3")
        raise UsageError(f"{url}: reading {scheme}:// needs the {extra!r} extra "
                         f"(pip install 'rexnet-serving[{extra}]'): {e}") from None
    except ValueError as e:  # an unknown protocol
        raise UsageError(f"{url}: {e}") from None


def access_error(url: str, error: BaseException) -> UsageError:
    """One clear line for a store that cannot be used: no credentials, no bucket, no network."""
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                "ClientAuthenticationError", "CredentialUnavailableError"):
        why = f"no usable credentials ({error}); see the README's object storage section"
    elif isinstance(error, PermissionError):
        why = f"access denied ({error})"
    elif isinstance(error, FileNotFoundError):
        why = f"no such bucket or object ({error})"
    else:
        why = f"the store is unreachable or refused the request ({name}: {error})"
    return UsageError(f"{url}: {why}")


def join(base: str, name: str) -> str:
    """``name`` relative to the folder URL ``base``, normalised (``a/../b`` is ``b``) so that an object
    has one name however a list file spells it (the name is the key of shards and resume)."""
    scheme = URL.match(base).group(0)
    return scheme + posixpath.normpath(base[len(scheme):].rstrip("/") + "/" + name)


def _full(url: str, path: str) -> str:
    """``path`` (as fsspec returns it, without the protocol) back as a URL of ``url``'s scheme."""
    return URL.match(url).group(0) + path


def list_images(url: str, is_image) -> Tuple[List[str], Optional[str]]:
    """The image URLs under a prefix, matched by a glob, or the URL itself; for a list file (any other
    single object), (its lines, its URL) so the caller resolves them relative to it."""
    fs, path = filesystem(url)
    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = fs.find(path)
        elif fs.isfile(path):
            if is_image(path):
                return [url], None
            return fs.cat_file(path).decode("utf-8").splitlines(), url
        else:
            raise FileNotFoundError(path)
    except UnicodeDecodeError:
        raise UsageError(f"{url}: neither an image nor a UTF-8 list file") from None
    except Exception as e:  # the backends raise their own types for credentials and connections
        raise access_error(url, e) from None
    return [_full(url, p) for p in sorted(found) if is_image(p)], None


def read_bytes(url: str, attempts: int = READ_ATTEMPTS, backoff: float = 0.5) -> bytes:
    """The object's bytes, retried with exponential backoff on transient errors (a missing object or
    a denied read is not retried). The callers' thread pools bound how many reads run at once."""
    fs, path = filesystem(url)
    for attempt in range(attempts):
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as e:
            if attempt + 1 == attempts:
                raise OSError(f"{type(e).__name__}: {e} (after {attempts} attempts)") from None
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


class RemoteOutput:
    """A result file on an object store, staged locally: ``local`` is what the writer appends to,
    ``commit()`` uploads it whole (atomically, see the module docstring).

    The staging folder is keyed by the URL, so a rerun in the same place (a restarted container with
    its emptyDir, a laptop) continues from its staging copy, which holds everything committed from
    there and what was written since; anywhere else, or when the committed object is larger (another
    machine got further), the committed object is downloaded first.
    """

    def __init__(self, url: str, overwrite: bool = False, staging: Optional[Path] = None) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)
        root = Path(staging or os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "rexnet-staging")
        key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        self.local = root / key / url.rstrip("/").rpartition("/")[2]
        try:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            if overwrite:
                self.local.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"{self.local}: cannot stage the output: {e.strerror or e}") from None
        if overwrite:
            return
        try:
            if not self.local.exists() or self._remote_size() > self.local.stat().st_size:
                self._download()  # nothing staged here, or another machine got further since
        except Exception as e:  # the backends raise their own types for credentials and connections
            raise access_error(url, e) from None

    def _remote_size(self) -> int:
        try:
            return int(self.fs.info(self.path).get("size") or 0)
        except FileNotFoundError:
            return 0

    def _download(self) -> None:
        try:
            self.fs.get_file(self.path, str(self.local) + ".download")
            os.replace(str(self.local) + ".download", self.local)
        except FileNotFoundError:
            pass  # nothing committed yet

    def discard_staging(self) -> None:
        """Remove the staging folder (everything in it was committed)."""
        shutil.rmtree(self.local.parent, ignore_errors=True)

    def commit(self) -> None:
        """Upload the staged file as the object (the previous object stays until this one is whole)."""
        if self.local.exists():
            self.fs.put_file(str(self.local), self.path)
            self.fs.invalidate_cache(self.path)


def write_text(target: str, text: str) -> None:
    """A whole small file (a summary) at a path or URL, atomically: rename locally, one PUT remotely."""
    if is_url(target) and file_url_path(target) is None:
        fs, path = filesystem(target)
        try:
            fs.pipe_file(path, text.encode("utf-8"))
        except Exception as e:
            raise access_error(target, e) from None
        return
    local = file_url_path(target) or Path(target)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        temporary = local.with_name(local.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, local)
    except OSError as e:
        raise UsageError(f"{local}: cannot write: {e.strerror or e}") from None


def read_text(source: str) -> Optional[str]:
    """A whole small file at a path or URL, None if there is none."""
    if is_url(source) and file_url_path(source) is None:
        fs, path = filesystem(source)
        try:
            return fs.cat_file(path).decode("utf-8")
        except FileNotFoundError:
            return None
        except Exception as e:
            raise access_error(source, e) from None
    local = file_url_path(source) or Path(source)
    return local.read_text(encoding="utf-8") if local.is_file() else None


def copy_local(source: Path, target: str) -> None:
    """``source`` to ``target`` (a path or URL), whole: rename locally, one upload remotely."""
    if is_url(target) and file_url_path(target) is None:
        fs, path = filesystem(target)
        fs.put_file(str(source), path)
        return
    local = file_url_path(target) or Path(target)
    temporary = local.with_name(local.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, local)

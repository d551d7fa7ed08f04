"""Build the Docker test images without a registry (through the Docker SDK; the CLI is never used).

kvt-test-base:bookworm   a debootstrap'd Debian bookworm minbase with python3 (no pip), imported from a
                         cached rootfs tarball ($KVT_TEST_CACHE, else /var/cache/kvt, else data/cache)
kvt-test-engine:latest   FROM the base + the TEST DOUBLE fake_openai_server.py as its entrypoint;
                         rebuilt whenever the server's source changes (label kvt.fake-sha256)

The first build needs root, debootstrap and the Debian mirror (~40 s); later ones take < 1 s.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from tests.fakes.fake_engine import FAKE_SERVER, SERVER_IN_IMAGE, TEST_IMAGE, TEST_TAG

BASE_REPO, BASE_TAG = "kvt-test-base", "bookworm"
BASE_REF = f"{BASE_REPO}:{BASE_TAG}"
TEST_REF = f"{TEST_IMAGE}:{TEST_TAG}"
SHA_LABEL = "kvt.fake-sha256"
MIRROR = os.environ.get("KVT_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def cache_dir() -> Path:
    env = os.environ.get("KVT_TEST_CACHE")
    candidates = [Path(env)] if env else [Path("/var/cache/kvt"), Path(__file__).resolve().parents[2] / "data" / "cache"]
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise RuntimeError(f"no writable cache dir among {candidates}")


def base_tarball() -> Path:
    """The cached rootfs tarball, made with debootstrap when missing."""
    tar = cache_dir() / f"{BASE_REPO}-{BASE_TAG}.tar"
    if tar.is_file():
        return tar
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install -y debootstrap) and "
                           f"{tar} is not cached")
    root = Path(tempfile.mkdtemp(prefix="kvt-rootfs-"))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", BASE_TAG, str(root), MIRROR],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        part = tar.with_suffix(".tar.partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(part), "."], check=True)
        os.replace(part, tar)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tar


def ensure_base_image(client: Any) -> Any:
    from docker.errors import ImageNotFound

    try:
        return client.images.get(BASE_REF)
    except ImageNotFound:
        pass
    client.api.import_image(src=str(base_tarball()), repository=BASE_REPO, tag=BASE_TAG)
    return client.images.get(BASE_REF)


def _fake_sha() -> str:
    return hashlib.sha256(FAKE_SERVER.read_bytes()).hexdigest()


def ensure_test_image(client: Any) -> Any:
    """kvt-test-engine:latest, (re)built when missing or when the fake server changed."""
    from docker.errors import ImageNotFound

    sha = _fake_sha()
    try:
        img = client.images.get(TEST_REF)
        if (img.labels or {}).get(SHA_LABEL) == sha:
            return img
    except ImageNotFound:
        pass
    ensure_base_image(client)
    dockerfile = (
        f"FROM {BASE_REF}\n"
        f"COPY fake_openai_server.py {SERVER_IN_IMAGE}\n"
        f'LABEL kvt.test-double="fake-openai-server" {SHA_LABEL}="{sha}"\n'
        f'ENTRYPOINT ["python3", "-u", "{SERVER_IN_IMAGE}"]\n'
    ).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("Dockerfile", dockerfile), ("fake_openai_server.py", FAKE_SERVER.read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    buf.seek(0)
    img, _ = client.images.build(fileobj=buf, custom_context=True, tag=TEST_REF, rm=True, forcerm=True, pull=False)
    return img

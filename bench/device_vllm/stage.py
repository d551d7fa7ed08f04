"""Stage the carry that puts a real vLLM (0.26.0, the release that pins the device's torch 2.11.0+cu130) and the
kvpress stack on the device machine, which has no network and takes at most 64 MiB per call.

    python bench/device_vllm/stage.py [--out .device-vllm] [--part-mib 56]

1. downloads the exact wheel sets for CPython 3.12 / manylinux x86_64 (`vllm-0.26.0-cp312.txt`,
   `kvpress-cp312.txt`, both pinned) with pip, --no-deps;
2. slims the vLLM wheel: drops members that serving a dense model on an H200 never loads (the FA2 kernels —
   sm90 runs FA3 —, the Rust frontend binary, the sm100 FMHA sources, deep_gemm builds for other Pythons);
3. packs everything into one uncompressed tar (wheels are already compressed), records its sha256, and splits it
   into parts of at most --part-mib MiB, one folder per part (`<out>/p01/`, `<out>/p02/`, …) so each device call
   carries exactly one folder;
4. writes `<out>/CALLS.md`: the device calls in order (carry + command), to be made back to back (the machine
   stays warm ~30 s after a call).

On the device, `bash bench/device_vllm/device.sh recv` keeps each part as it arrives and `… install`
reassembles, checks the sha256 and installs (see device.sh). Idempotent: downloads are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_26_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux2010_x86_64", "linux_x86_64"]
SETS = {"vllm": HERE / "vllm-0.26.0-cp312.txt", "kvpress": HERE / "kvpress-cp312.txt"}
# members of the vLLM wheel that serving a dense model on sm90 does not load (flash_attn_interface imports the FA2
# library inside try/except; the Rust frontend is opt-in via VLLM_RUST_FRONTEND_PATH)
VLLM_DROP_PREFIXES = ("vllm/vllm_flash_attn/_vllm_fa2_C", "vllm/vllm-rs", "vllm/third_party/fmha_sm100/",
                      *(f"vllm/third_party/deep_gemm/_C.cpython-{v}-" for v in ("310", "311", "313", "314")))


def pins(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def download(reqs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + reqs, check=True)


def slim_vllm(wheel: Path, out_dir: Path) -> Path:
    """A copy of the vLLM wheel without VLLM_DROP_PREFIXES (same file name: pip needs it)."""
    out = out_dir / wheel.name
    if out.is_file() and out.stat().st_mtime >= wheel.stat().st_mtime:
        return out
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            if info.filename.startswith(VLLM_DROP_PREFIXES):
                continue
            # keep each member's own compression: no recompression cost, same bytes
            zout.writestr(info, zin.read(info.filename), compress_type=info.compress_type)
    tmp.replace(out)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".device-vllm", help="staging dir (git-ignore it: .git/info/exclude)")
    ap.add_argument("--part-mib", type=int, default=56, help="largest part; a call carries 64 MiB in all")
    a = ap.parse_args(argv)
    out = Path(a.out)
    dl = out / "download"
    payload = out / "payload"
    shutil.rmtree(payload, ignore_errors=True)
    for name, lst in SETS.items():
        download(pins(lst), dl / name)
        (payload / name).mkdir(parents=True)
        wanted = {p.split("==")[0].lower().replace("_", "-") for p in pins(lst)}
        for whl in sorted((dl / name).glob("*.whl")):
            dist = whl.name.split("-")[0].lower().replace("_", "-")
            if dist not in wanted:
                continue  # a stale download from an earlier pin list
            if dist == "vllm":
                slim_vllm(whl, payload / name)
            else:
                shutil.copy2(whl, payload / name / whl.name)
    tar_path = out / "carry.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(payload, arcname="payload")
    digest = sha256(tar_path)
    for old in out.glob("p[0-9][0-9]"):
        shutil.rmtree(old)
    size, part = a.part_mib << 20, 0
    with tar_path.open("rb") as f:
        while chunk := f.read(size):
            part += 1
            d = out / f"p{part:02d}"
            d.mkdir()
            (d / f"carry.tar.{part:02d}").write_bytes(chunk)
    meta = {"sha256": digest, "bytes": tar_path.stat().st_size, "parts": part,
            "wheels": {n: sorted(p.name for p in (payload / n).glob("*.whl")) for n in SETS}}
    (out / "carry.json").write_text(json.dumps(meta, indent=1))
    tar_path.unlink()
    lines = [f"# Device calls for vLLM 0.26.0 ({meta['bytes'] / 2**20:.0f} MiB in {part} parts, sha256 {digest})", "",
             "Make them back to back (the machine stays warm ~30 s after a call).", ""]
    for i in range(1, part + 1):
        carry = [f"{out}/p{i:02d}"] + ([f"{out}/carry.json"] if i == part else [])
        cmd = "bash bench/device_vllm/device.sh recv" + (" && bash bench/device_vllm/device.sh install" if i == part else "")
        lines += [f"{i}. carry {json.dumps(carry)}", f"   `{cmd}`"]
    lines += ["", "Then, on the warm machine: `bash bench/device_vllm/device.sh accuracy` and "
              "`bash bench/device_vllm/device.sh speed`."]
    (out / "CALLS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

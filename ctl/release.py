"""``ttcs-ctl release build``: a release bundle for the cabinets (docs/UPDATE.md).

One tar file: the project's wheel, every dependency as wheels for each platform asked for,
and ``manifest.json`` (version, each file's sha256, what each platform got). A device installs
from it with ``pip install --no-index``: it never needs the package index.

Platforms: ``arm64`` and ``armhf`` (Raspberry Pi OS 64- and 32-bit), ``native`` (this
machine: tests, an x86 cabinet). A dependency without a wheel for a platform is named in the
output and in the manifest, and the exit status is 2: that platform cannot install the bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from agent.update.bundle import MANIFEST, WHEELS, sha256_file

PLATFORMS: dict[str, list[str]] = {
    "native": [],
    "arm64": ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64",
              "manylinux_2_31_aarch64", "manylinux_2_36_aarch64", "linux_aarch64"],
    "armhf": ["manylinux2014_armv7l", "manylinux_2_17_armv7l", "manylinux_2_31_armv7l",
              "manylinux_2_36_armv7l", "linux_armv7l"],
}
DEFAULT_PLATFORMS = ("arm64", "armhf")
EXIT_INCOMPLETE = 2
_MISSING = re.compile(r"(?:No matching distribution found for|satisfies the requirement) (\S+)")


def source_snapshot(src: Path, dest: Path) -> Path:
    """Copy the source's tracked (and untracked, not ignored) files: no build/ in the checkout."""
    try:
        out = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], check=True, capture_output=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()
                 and not {".git", ".venv", "__pycache__"} & set(p.relative_to(src).parts)]
    for name in names:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
    return dest


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def _platform_args(name: str, python: str) -> list[str]:
    tags = PLATFORMS[name]
    if not tags:
        return []
    nodot = python.replace(".", "")
    out = [f"--python-version={python}", "--implementation=cp", f"--abi=cp{nodot}",
           "--abi=abi3", "--abi=none"]
    return out + [f"--platform={t}" for t in tags]


def _requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def _missing_direct(project: Path, dest: Path, args: list[str]) -> set[str]:
    """pip names only the first requirement it cannot satisfy: try each direct one alone."""
    return {req for req in _requirements(project)
            if _pip(["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
                     *args, req]).returncode != 0}


def build(src: Path, out_dir: Path, *, platforms: list[str], python: str = "3.11",
          index_args: list[str] | None = None, log=print) -> tuple[Path, dict]:
    """Build the bundle into ``out_dir``; return its path and manifest."""
    index_args = index_args or []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ttcs-release-") as tmp:
        snap = source_snapshot(src, Path(tmp) / "src")
        root = Path(tmp) / "bundle"
        wheels = root / WHEELS
        wheels.mkdir(parents=True)
        r = _pip(["wheel", "--no-deps", "-q", "-w", str(wheels), *index_args, str(snap)])
        if r.returncode != 0:
            raise RuntimeError("building the project's wheel failed:\n" + r.stderr[-2000:])
        (project,) = wheels.glob("ttcs_agent-*.whl")
        version = project.name.split("-")[1]
        report: dict[str, dict] = {}
        for name in platforms:
            r = _pip(["download", "-q", "--only-binary=:all:", "-d", str(wheels), *index_args,
                      *_platform_args(name, python), str(project)])
            if r.returncode == 0:
                report[name] = {"complete": True}
                log(f"{name}: every dependency has a wheel")
                continue
            missing = sorted(set(_MISSING.findall(r.stderr)) | _missing_direct(
                project, wheels, [*index_args, *_platform_args(name, python)]))
            report[name] = {"complete": False, "missing": missing,
                            "pip": r.stderr.strip().splitlines()[-3:]}
            log(f"{name}: INCOMPLETE, no wheel for {', '.join(missing) or '?'} "
                f"(pip: {r.stderr.strip().splitlines()[-1:]})")
        files = {f"{WHEELS}/{p.name}": sha256_file(p) for p in sorted(wheels.iterdir())}
        manifest = {"v": 1, "version": version, "python": python, "platforms": report,
                    "files": files}
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        bundle = out_dir / f"ttcs-agent-{version}.tar"
        tmp_bundle = bundle.with_suffix(".tar.tmp")
        with tarfile.open(tmp_bundle, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(root / MANIFEST, MANIFEST)
            for name in files:
                tar.add(root / name, name)
        os.replace(tmp_bundle, bundle)
    return bundle, manifest


def main(args) -> int:
    """``ttcs-ctl release build``: print the bundle, its sha256 and each platform's verdict."""
    index_args = [f"--find-links={d}" for d in args.find_links] + (
        ["--no-index"] if args.no_index else [])
    src = Path(args.src).resolve()
    try:
        bundle, manifest = build(src, Path(args.out), platforms=args.platform or
                                 list(DEFAULT_PLATFORMS), python=args.python,
                                 index_args=index_args)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"release build: {e}", file=sys.stderr)
        return 1
    sha = sha256_file(bundle)
    print(f"{bundle}: version {manifest['version']}, {len(manifest['files'])} files, "
          f"{bundle.stat().st_size} bytes\nsha256 {sha}")
    print("update args (put the bundle on a host in security.media_hosts):")
    print(json.dumps({"version": manifest["version"], "url": f"https://HOST/{bundle.name}",
                      "sha256": sha, "size": bundle.stat().st_size}))
    return 0 if all(p["complete"] for p in manifest["platforms"].values()) else EXIT_INCOMPLETE


def add_parser(sub) -> None:
    p = sub.add_parser("release", help="release bundles for updates over the air")
    rsub = p.add_subparsers(dest="action", required=True)
    b = rsub.add_parser("build", help="one tar of wheels + manifest.json for the cabinets")
    b.add_argument("--out", required=True, help="folder for the bundle")
    b.add_argument("--platform", action="append", choices=sorted(PLATFORMS),
                   help="repeatable; default: arm64 and armhf")
    b.add_argument("--python", default="3.11", help="the cabinets' Python (default 3.11)")
    b.add_argument("--src", default=str(Path(__file__).resolve().parent.parent),
                   help="the source checkout (default: this one)")
    b.add_argument("--find-links", action="append", default=[], metavar="DIR",
                   help="extra wheel folder (repeatable)")
    b.add_argument("--no-index", action="store_true", help="use only --find-links folders")

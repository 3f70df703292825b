"""Sizes and build times of the two images, built the way the README says (`compose build`).

    python benchmarks/docker_images.py [--services emkum-cpu emkum]

For each service: a cold build (`--no-cache`: every step runs, pip downloads every wheel; the base
images already exist, docker/local_bases.sh times those itself), then a cached rebuild with nothing
changed, then a rebuild after a change to the service's code (a copy of the build context with one
line added to service/app.py: only the layers from the source COPY on are rebuilt), and the image
size Docker reports. Needs the bases' names in the environment, as the README's deployment section
sets them (`source <(docker/local_bases.sh --env)`) or the official images reachable, and the
exported default model in artifacts/ (`emkum build-default`).
Writes benchmarks/results/docker_images.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402

IMAGES = {"emkum-cpu": "emkum-retrieval:cpu", "emkum": "emkum-retrieval:gpu"}


def compose() -> list[str]:
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def timed_build(project_dir: Path, service: str, *flags: str) -> float:
    t0 = time.perf_counter()
    cmd = [*compose(), "--project-directory", str(project_dir), "-f", str(project_dir / "docker-compose.yml")]
    subprocess.run([*cmd, "--profile", "cpu", "build", *flags, service], check=True, capture_output=True)
    return time.perf_counter() - t0


def changed_context(tmp: Path) -> Path:
    """The build context with a one-line change in the service's code."""
    copy = tmp / "context"
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "data", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, copy, ignore=ignore, symlinks=True)
    with (copy / "service" / "app.py").open("a") as f:
        f.write(f"\n# benchmark change {time.time()}\n")
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/docker_images.json")
    args = parser.parse_args()
    report = {"machine": describe(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        context = changed_context(Path(tmp))
        for service in args.services:
            cold = timed_build(ROOT, service, "--no-cache")
            cached = timed_build(ROOT, service)
            after_change = timed_build(context, service)
            size = subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", IMAGES[service]],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            record(
                report,
                {
                    "service": service,
                    "image": IMAGES[service],
                    "size_mb": round(int(size) / 1e6),
                    "cold_build_s": round(cold, 1),
                    "cached_rebuild_s": round(cached, 1),
                    "rebuild_after_code_change_s": round(after_change, 1),
                },
            )
        for service in args.services:  # leave the tags on this checkout's own build
            timed_build(ROOT, service)
    write_report(args.out, report)


if __name__ == "__main__":
    main()

"""Does the time to reject a wrong API key depend on how much of it was right?

Two wrong keys of the configured key's length: one that differs in its first byte, one that differs
only in its last. Each is checked by the service's own `require_api_key` many times, interleaved in
random order so that drift hits both alike; the report gives the median time of each and a
Mann-Whitney U test of "same distribution" (each sample uses a fresh copy of its key). The same run
measures a naive `==` on the same inputs as a control: a benchmark that could not see the naive
comparison's leak would prove nothing about the real one. Keys are long (64 KiB) so that the naive
leak is large enough to see; the real check is measured at that length and at the length of a
typical key (32 characters).

    python benchmarks/auth_timing.py          # ~1 minute; writes benchmarks/results/auth_timing.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from pydantic import SecretStr
from scipy.stats import mannwhitneyu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402
from service.deps import require_api_key  # noqa: E402
from service.errors import ApiError  # noqa: E402


def fake_request(key: str) -> SimpleNamespace:
    settings = SimpleNamespace(api_key=SecretStr(key))
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(emkum=SimpleNamespace(settings=settings))))


def real_check(request, given: str) -> None:
    try:
        require_api_key(request, given)
    except ApiError:
        return
    raise AssertionError("a wrong key was accepted")


def naive_check(request, given: str) -> None:
    if given == request.app.state.emkum.settings.api_key.get_secret_value():
        raise AssertionError("a wrong key was accepted")


def measure(check, request, keys: dict[str, str], samples: int, inner: int) -> dict[str, np.ndarray]:
    """`samples` timings per key, each the mean of `inner` calls, in shuffled order."""
    order = [name for name in keys for _ in range(samples)]
    random.Random(0).shuffle(order)
    out: dict[str, list[float]] = {name: [] for name in keys}
    for name in order:
        # a fresh copy per sample: where a string lands in memory changes how fast it is read, and one
        # fixed object per key measured that (a few hundred ns at 64 KiB) instead of the comparison
        given = keys[name][:1] + keys[name][1:]
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            check(request, given)
        out[name].append((time.perf_counter_ns() - t0) / inner)
    return {k: np.array(v) for k, v in out.items()}


def compare(timings: dict[str, np.ndarray]) -> dict:
    first, last = timings["differs_at_first_byte"], timings["differs_at_last_byte"]
    return {
        "median_ns_differs_at_first_byte": round(float(np.median(first)), 1),
        "median_ns_differs_at_last_byte": round(float(np.median(last)), 1),
        "median_difference_ns": round(float(np.median(last) - np.median(first)), 1),
        "mann_whitney_p": float(mannwhitneyu(first, last).pvalue),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "auth_timing.json")
    args = ap.parse_args()
    report = {"machine": describe(), "samples_per_key": args.samples, "rows": []}
    for length, inner in ((64 * 1024, 20), (32, 200)):
        key = "k" * length
        keys = {"differs_at_first_byte": "x" + key[1:], "differs_at_last_byte": key[:-1] + "x"}
        request = fake_request(key)
        for name, check in (("require_api_key (hmac.compare_digest)", real_check), ("naive == (control)", naive_check)):
            row = {"check": name, "key_length": length, **compare(measure(check, request, keys, args.samples, inner))}
            record(report, row)
    write_report(args.out, report)


if __name__ == "__main__":
    main()

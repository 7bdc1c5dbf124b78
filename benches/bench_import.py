"""How much `import filterjax` adds to `import jax`, and what it imports.

    python benches/bench_import.py            # 10 fresh processes of each, interleaved
    python benches/bench_import.py --runs 30  # more samples on a noisy machine

Each sample is a fresh interpreter that times its own import(s) with `time.perf_counter`
(interpreter start-up is excluded). Baseline processes run `import jax`; measured processes
run `import jax` then `import filterjax`, and also report the time of `import filterjax`
alone. The two kinds alternate so drift on a shared machine hits both equally. The headline
number is the median, over the measured processes, of the time `import filterjax` takes
after `import jax` (a paired measurement, so the large process-to-process spread of
`import jax` itself cancels); the difference of the two medians is shown as a cross-check.
The target is at most 15 ms added.

It also checks that `import filterjax` imports nothing heavy or optional (Equinox, SciPy,
optax, ...) and none of the lazily loaded transform modules, prints the slowest modules
filterjax itself imports (`python -X importtime`), and writes the table to
`benches/results/import.md`. Exit status 1 if the module check fails; timing never fails
the script (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

TARGET_MS = 15.0
RESULTS = Path(__file__).resolve().parent / "results" / "import.md"
MUST_NOT_IMPORT = ("equinox", "scipy", "optax", "flax", "hypothesis", "pytest", "jaxtyping")

_TIMED = """
import time
t0 = time.perf_counter()
import jax
t1 = time.perf_counter()
{extra}
t2 = time.perf_counter()
print((t1 - t0) * 1e3, (t2 - t0) * 1e3)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _sample(with_filterjax: bool) -> tuple[float, float]:
    code = _TIMED.format(extra="import filterjax" if with_filterjax else "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def measure(runs: int) -> dict[str, list[float]]:
    jax_only: list[float] = []
    with_fj: list[float] = []
    fj_part: list[float] = []
    _sample(False)  # warm the OS file cache once before timing
    _sample(True)
    for i in range(runs):
        # Alternate which goes first, so neither always follows the other.
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_filterjax in order:
            t_jax, t_total = _sample(with_filterjax)
            if with_filterjax:
                with_fj.append(t_total)
                fj_part.append(t_total - t_jax)
            else:
                jax_only.append(t_total)
    return {"jax": jax_only, "jax+filterjax": with_fj, "filterjax alone": fj_part}


def imported_modules() -> dict[str, list[str]]:
    code = (
        "import json, sys; import filterjax; "
        "print(json.dumps({'modules': sorted(sys.modules), "
        "'lazy': sorted({'filterjax' + m for m in filterjax._LAZY.values()})}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out)
    modules = set(report["modules"])
    heavy = sorted(m for m in modules if m.split(".")[0] in MUST_NOT_IMPORT)
    eager = sorted(modules & set(report["lazy"]))
    return {"heavy": heavy, "eager": eager}


def slowest_filterjax_imports(limit: int = 8) -> list[tuple[int, str]]:
    """Cumulative import time (us) of what `import filterjax` imports after jax is loaded."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import jax; import filterjax"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = run.stderr.splitlines()
    # Everything after jax's own top-level line was imported for filterjax.
    start = max(i for i, line in enumerate(lines) if line.rstrip().endswith("| jax"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("import time:"):
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        rows.append((int(cumulative), name))
    return sorted(rows, reverse=True)[:limit]


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"Python {platform.python_version()}"]
    for dist in ("jax", "jaxlib", "filterjax"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} (source tree)")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh processes of each kind")
    parser.add_argument("--no-write", action="store_true", help="don't write the results file")
    args = parser.parse_args()

    import filterjax

    samples = measure(args.runs)
    med = {name: statistics.median(values) for name, values in samples.items()}
    added = med["filterjax alone"]
    difference = med["jax+filterjax"] - med["jax"]
    modules = imported_modules()
    slowest = slowest_filterjax_imports()

    verdict = "within" if added <= TARGET_MS else "OVER"
    table = [
        "| import | median (ms) | min (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        table.append(
            f"| `{name}` | {statistics.median(values):.1f} | {min(values):.1f} "
            f"| {max(values):.1f} |"
        )
    lines = [
        "# Import time",
        "",
        f"`import filterjax` adds **{added:.1f} ms** to `import jax` (median over "
        f"{args.runs} fresh processes of the time `import filterjax` takes right after "
        f"`import jax`; target <= {TARGET_MS:.0f} ms: {verdict}). Cross-check, difference "
        f"of the medians of whole imports in {args.runs} + {args.runs} interleaved "
        f"processes: {difference:+.1f} ms (noisy: `import jax` alone varies by "
        f"{max(samples['jax']) - min(samples['jax']):.0f} ms between processes here).",
        "",
        *table,
        "",
        "Slowest imports under `import filterjax` once jax is loaded "
        "(`python -X importtime`, cumulative, one run):",
        "",
        "| module | cumulative (ms) |",
        "| --- | ---: |",
        *[f"| `{name}` | {us / 1e3:.1f} |" for us, name in slowest],
        "",
        "Modules `import filterjax` must not import: "
        + (
            "none imported."
            if not modules["heavy"] and not modules["eager"]
            else f"**imported {modules['heavy'] + modules['eager']}**."
        ),
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({os.cpu_count()} cores), {platform.system()}; {_versions()}; "
        f"backend {filterjax.backend()}.",
        "",
        "Reproduce: `python benches/bench_import.py` (from an environment where filterjax "
        "is installed).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report)
        print(f"written to {RESULTS}")
    if modules["heavy"] or modules["eager"]:
        print(f"ERROR: import filterjax imported {modules['heavy'] + modules['eager']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

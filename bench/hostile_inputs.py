"""How a checkout handles hostile and broken recipes: runs `sdbuild plan` in process on the
catalogue of tests/hostile.py plus seeded random mutations of a valid recipe, and counts clean
located errors, tracebacks, hangs, errors without a line and bad recipes accepted.

    .venv/bin/python bench/hostile_inputs.py [--mutations 250] [--source DIR]

`--source DIR` measures another checkout's `builder` (e.g. `git archive main | tar -x -C DIR`)
with this checkout's cases, for before/after figures. A case still running after --hang-seconds
is stopped by an alarm and counted as a hang.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that nothing on the way catches it as an error."""


def _use_source(source: Path) -> None:
    """Import `builder` from `source` instead of the editable install of this checkout."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in type(finder).__module__]
    sys.path.insert(0, str(source))


def _mutations(valid: str, count: int, seed: int) -> list[str]:
    """Line-level mutations like the Hypothesis strategy's, from a seeded generator."""
    values = ["true", "null", "''", "1e999", "2024-13-45", "9" * 5000, "*x", "[" * 40, "x" * 300, "-1", "[0, 8]"]
    values += ["{preset: tiny-sdxl}", "../../etc", "[100000, 100000]", "{local: {path: ''}}", "!!binary AAAA"]
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        lines = valid.splitlines()
        for _ in range(rng.randint(1, 3)):
            index = rng.randrange(len(lines))
            action = rng.choice(["value", "drop", "duplicate", "indent", "truncate"])
            if action == "value" and ":" in lines[index]:
                lines[index] = lines[index].split(":", 1)[0] + ": " + rng.choice(values)
            elif action == "drop" and len(lines) > 1:
                del lines[index]
            elif action == "duplicate":
                lines.insert(index, lines[index])
            elif action == "indent":
                lines[index] = "  " + lines[index]
            else:
                lines[index] = lines[index][: rng.randint(0, len(lines[index]))]
        found.append("\n".join(lines) + "\n")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=int, default=60)
    parser.add_argument("--source", type=Path, default=None, help="measure the builder package in this folder")
    parser.add_argument("--list", action="store_true", help="name every case that is not a clean located error")
    args = parser.parse_args()
    if args.source is not None:
        _use_source(args.source.resolve())
    sys.path.insert(0, str(HERE.parent / "tests"))
    from hostile import VALID, Case, catalogue, plan, write_case

    import builder

    def alarm(signum, frame):
        raise Hang

    signal.signal(signal.SIGALRM, alarm)
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    workspace = root / "ws"
    cases = catalogue(workspace, root / "outside")
    mutated = [Case(f"mutation {i}", text, "") for i, text in enumerate(_mutations(VALID, args.mutations, args.seed))]
    counts: Counter[str] = Counter()
    named: dict[str, list[str]] = {}
    slowest = (0.0, "")
    for case in [*cases, *mutated]:
        bad = not case.name.startswith("mutation")
        recipe = write_case(workspace, case)
        signal.alarm(args.hang_seconds)
        try:
            outcome = plan(workspace, recipe)
        except Hang:
            counts["hang"] += 1
            named.setdefault("hang", []).append(case.name)
            continue
        finally:
            signal.alarm(0)
        if outcome.output.count("\n") > 200:
            counts["flood (>200 lines)"] += 1
        slowest = max(slowest, (outcome.seconds, case.name))
        if outcome.traceback or outcome.code not in (0, 2):
            kind = "traceback"
        elif outcome.code == 0:
            kind = "accepted bad recipe" if bad else "valid after mutation"
        elif outcome.located(case.where or recipe, line=case.line):
            kind = "clean located error"
        else:
            kind = "error without a line or fix"
        counts[kind] += 1
        if kind != "clean located error":
            named.setdefault(kind, []).append(case.name)
    print(
        json.dumps(
            {
                "builder": str(Path(builder.__file__).parent),
                "catalogue": len(cases),
                "mutations": len(mutated),
                "outcomes": dict(sorted(counts.items())),
                "slowest_seconds": round(slowest[0], 2),
                "slowest_case": slowest[1],
            }
            | ({"cases": named} if args.list else {}),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""Worker process for train.rewards.VerifyPool: reads JSON lines [pred, gold] on stdin, writes `1` or `0` per line.

Run as a plain script (`python train/_verify_worker.py SECONDS`) so it never re-imports the caller's main module
and is safe to start from a process that already runs torch/CUDA threads. math-verify's own SIGALRM timeout works
here (this is a main thread); the parent kills us if even that does not return in time.
"""

import functools
import json
import logging
import sys


@functools.lru_cache(maxsize=4096)
def parsed(text: str, seconds: int):
    """Parse once per distinct answer: in GRPO all G completions of a problem share the gold (and often answers)."""
    from math_verify import parse

    return parse("\\boxed{" + text + "}", parsing_timeout=seconds, raise_on_error=True)


def check(pred: str, gold: str, seconds: int) -> bool:
    from math_verify import verify

    g, p = parsed(gold, seconds), parsed(pred, seconds)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=seconds))


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    logging.disable(logging.WARNING)  # math-verify logs every parse failure / timeout
    import math_verify  # noqa: F401  (import before announcing readiness)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            ok = check(pred, gold, seconds)
        except BaseException:  # noqa: BLE001 - sympy raises anything, RecursionError and TimeoutException included
            ok = False
        sys.stdout.write("1\n" if ok else "0\n")
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away or closed us: nothing to report
        sys.exit(0)

"""Running one property with hypothesis, programmatically: for `minifd check` and for the tests.

hypothesis draws cases from the property's strategy and calls its check on each; on a failure it
shrinks the case to a minimal one and raises that example's exception, which is replayed last, so
the last case tried is the shrunk falsifying example. Runs keep no example database and have no
deadline: with a seed, the same build gives the same examples and the same report.
"""

import time
import traceback
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky, HypothesisException

from minifd.properties.registry import backend_name
from minifd.properties.tolerance import Outcome, PropertyFailure


@dataclass
class PropertyResult:
    """What `minifd check` prints for one property (and writes to --json)."""

    name: str
    examples: int  # examples that ran to completion (those hypothesis rejected are not counted)
    worst_error: float  # relative error of the element closest to its bound, over every example
    bound: float  # that element's relative bound
    recomputed: int  # attention rows recomputed with the synchronised method, over every example
    seconds: float
    passed: bool
    failure: str = ""  # the shrunk falsifying example, pasteable, and what went wrong


class _Tally:
    def __init__(self):
        self.examples, self.recomputed = 0, 0
        self.worst = Outcome(0.0, 0.0)

    def add(self, outcome):
        self.examples += 1
        self.recomputed += outcome.recomputed
        if outcome.closeness >= self.worst.closeness:
            self.worst = outcome


def run_property(prop, xp, max_examples, seed=None):
    """Check `prop` on up to max_examples hypothesis cases on backend `xp` (numpy or cupy).
    seed: hypothesis's seed (None: a random one) -> PropertyResult."""
    backend = backend_name(xp)
    tally, last_case = _Tally(), []

    def check_case(case):
        last_case[:] = [case]
        tally.add(prop.check(case, xp))

    test = given(case=prop.cases(backend))(check_case)
    test = settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], verbosity=Verbosity.normal)(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    start = time.perf_counter()
    failure = ""
    try:
        test()
    except Exception as error:  # noqa: BLE001 - any exception is a failed property, reported with its example
        failure = describe_failure(prop.name, backend, last_case[0] if last_case else None, error, seed)
    return PropertyResult(prop.name, tally.examples, tally.worst.error, tally.worst.bound, tally.recomputed,
                          time.perf_counter() - start, not failure, failure)


def describe_failure(name, backend, case, error, seed):
    """-> text for a bug report: the shrunk case, the error, and Python that replays the case."""
    module = "cupy" if backend == "gpu" else "numpy"
    lines = [f"{name} failed on {backend} (hypothesis seed {seed if seed is not None else 'random'})"]
    if case is None or (isinstance(error, HypothesisException) and not isinstance(error, Flaky)):
        lines.append(f"  {type(error).__name__}: {error}")  # e.g. no example could be generated
        return "\n".join(lines)
    lines.append(f"  {'flaky' if isinstance(error, Flaky) else 'shrunk falsifying'} example: case = {case!r}")
    if isinstance(error, PropertyFailure):
        lines.append(f"  {error}")
    else:  # the kernel raised: where in minifd, and what
        frames = traceback.extract_tb(error.__traceback__)
        frames = traceback.format_list(([f for f in frames if "minifd" in f.filename] or frames)[-2:])
        lines += ["  " + line for frame in frames for line in frame.rstrip().splitlines()]
        lines.append(f"  {type(error).__name__}: {error}")
    lines += [f"  notes: {note}" for note in getattr(error, "__notes__", []) if not note.startswith("Falsifying")]
    replay = (f"import {module}; from minifd.properties import PROPERTIES; "
              f"print(PROPERTIES['{name}'].check({case!r}, {module}))")
    lines += ["  reproduce:", f'    python -c "{replay}"']
    return "\n".join(lines)
